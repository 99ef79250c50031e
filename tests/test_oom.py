"""Out of memory in a tile: the engine splits it and the rest of the work, and the result stays exact.

OOM is injected on CPU through ``engine.before_tile``, which is called before each tile x time chunk
with (segment, tile, core, chunk) and here raises ``torch.OutOfMemoryError`` where a test says.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import max_diff, model_state, untiled_decode, untiled_encode, video
from PIL import Image

import quadtree_vae as qv
from quadtree_vae import demo, engine
from quadtree_vae.cli import main
from quadtree_vae.geometry import Region, check_layout, subdivide
from quadtree_vae.planner import Replanner

TOL = 1e-4
Where = Callable[[int, int, Region, int], bool]


class Injector:
    """``engine.before_tile`` that raises OOM where ``where(segment, tile, core, chunk)`` holds, at most
    ``times`` times (None: always); it records every tile it failed."""

    def __init__(self, where: Where, times: int | None = 1):
        self.where, self.times, self.failed = where, times, []

    def __call__(self, segment: int, tile: int, core: Region, chunk: int) -> None:
        if (self.times is None or len(self.failed) < self.times) and self.where(segment, tile, core, chunk):
            self.failed.append((segment, tile, core, chunk))
            raise torch.OutOfMemoryError("injected: CUDA out of memory")


@pytest.fixture
def inject(monkeypatch):
    def install(where: Where, times: int | None = 1) -> Injector:
        injector = Injector(where, times)
        monkeypatch.setattr(engine, "before_tile", injector)
        return injector

    return install


def at(segment: int, tile: int, chunk: int = 0) -> Where:
    return lambda s, t, _, c: (s, t, c) == (segment, tile, chunk)


def tiled_segments(plan: qv.Plan) -> list[int]:
    """Segments of ``plan`` with at least three tiles (so a tile can be first, middle or last)."""
    return [i for i, s in enumerate(plan.segments) if not s.is_global and len(s.layout) >= 3]


def biggest(plan: qv.Plan, segment: int) -> int:
    """The largest tile of a segment after its first (so one that can be split)."""
    layout = plan.segments[segment].layout
    return max(range(1, len(layout)), key=lambda i: layout[i].area)


def replans(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "tile limit" in str(w.message)]


def run_with_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, replans(caught)


# ----------------------------------------------------------------------------------------- SD (images)

SD_CASES = {  # op -> (input shape, tile)
    "encode": ((1, 3, 96, 128), 64),
    "decode": ((1, 4, 12, 16), 64),
}


def _sd_input(op: str) -> torch.Tensor:
    shape = SD_CASES[op][0]
    g = torch.Generator().manual_seed(3)
    return torch.rand(shape, generator=g) * 2 - 1 if op == "encode" else torch.randn(shape, generator=g)


def _untiled(vae, op: str, x: torch.Tensor) -> torch.Tensor:
    return untiled_encode(vae, x) if op == "encode" else untiled_decode(vae, x)


def _tiled(vae, op: str, x: torch.Tensor, **options) -> torch.Tensor:
    return (qv.encode if op == "encode" else qv.decode)(vae, x, **options)


def _pick(plan: qv.Plan, which: str) -> tuple[int, int]:
    """(segment, tile) for an OOM in the first tile, a middle tile, or a middle tile of a later segment."""
    segs = tiled_segments(plan)
    assert len(segs) >= 2, plan.describe()
    seg = segs[-1] if which == "later segment" else segs[0]
    return seg, 0 if which == "first tile" else len(plan.segments[seg].layout) // 2


@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("which", ["first tile", "middle tile", "later segment"])
def test_sd_oom_in_one_tile_replans_and_stays_exact(sd, inject, op, which):
    x = _sd_input(op)
    tile = SD_CASES[op][1]
    seg, ti = _pick(qv.plan(sd, x.shape, tile=tile), which)
    injector = inject(at(seg, ti))
    out, warned = run_with_warnings(_tiled, sd, op, x, tile=tile)
    assert [f[:2] for f in injector.failed] == [(seg, ti)]
    assert len(warned) == 1 and f"segment {seg} " in warned[0] and "tiles of at most" in warned[0]
    assert max_diff(out, _untiled(sd, op, x)) <= TOL


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_sd_repeated_oom_replans_twice(sd, inject, op):
    """The first tile of a segment fails, then the first of its pieces too: two replans, each lower."""
    x = _sd_input(op)
    tile = SD_CASES[op][1]
    seg = tiled_segments(qv.plan(sd, x.shape, tile=tile))[0]
    injector = inject(at(seg, 0), times=2)
    out, warned = run_with_warnings(_tiled, sd, op, x, tile=tile)
    assert len(injector.failed) == 2
    first, second = (f[2] for f in injector.failed)
    assert second.area < first.area  # the second failure was a piece of the first tile
    assert len(warned) == 2
    assert max_diff(out, _untiled(sd, op, x)) <= TOL


def test_sd_oom_in_two_segments_lowers_the_limit_for_the_rest(sd, inject):
    x = _sd_input("decode")
    plan = qv.plan(sd, x.shape, tile=64)
    first, later = tiled_segments(plan)[0], tiled_segments(plan)[-1]
    hit: set[int] = set()

    def once_in_each(s: int, t: int, core: Region, c: int) -> bool:
        fire = t == 1 and s in (first, later) and s not in hit
        hit.add(s) if fire else None
        return fire

    injector = inject(once_in_each, times=None)
    out, warned = run_with_warnings(qv.decode, sd, x, tile=64)
    assert [f[:2] for f in injector.failed] == [(first, 1), (later, 1)]
    assert len(warned) == 2
    assert max_diff(out, untiled_decode(sd, x)) <= TOL


def test_oom_on_every_tile_gives_a_clear_error_and_leaves_the_model_alone(sd, inject):
    x = _sd_input("decode")
    before = model_state(sd)
    plan = qv.plan(sd, x.shape, tile=64)
    inject(lambda *_: True, times=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(qv.OutOfMemoryError, match="smallest plan tried") as err:
            qv.decode(sd, x, tile=64)
    assert isinstance(err.value, torch.OutOfMemoryError)  # a UI's own OOM fallback still catches it
    assert isinstance(err.value.plan, qv.Plan) and err.value.plan.tile_limit < plan.tile_limit
    assert len(replans(caught)) >= 2  # it tried smaller tiles before giving up
    assert model_state(sd) == before
    engine.before_tile = None
    assert max_diff(qv.decode(sd, x, tile=64), untiled_decode(sd, x)) <= TOL  # the model still works


def test_exhausted_through_hooks_leaves_the_model_unpatched(sd, inject):
    x = _sd_input("decode")
    before = model_state(sd)
    inject(lambda *_: True, times=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(qv.OutOfMemoryError), qv.tiled(sd, tile=64):
            sd.decode(x)
    assert model_state(sd) == before


def test_cli_out_of_memory_is_an_error_line_and_writes_nothing(tmp_path, inject, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(np.asarray(demo.sample_image((64, 64)))).save(src)
    inject(lambda *_: True, times=None)
    code = main(["encode", str(src), "-o", str(tmp_path / "z.safetensors"), "--vae", "random:sd:tiny",
                 "--tile", "32", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: out of memory" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


# ------------------------------------------------------------------------------------ Wan 2.1 (video)

WAN_CASES = {  # op -> (input shape, tile): three time windows of one latent frame each
    "encode": ((1, 3, 9, 40, 56), 24),
    "decode": ((1, 4, 3, 5, 7), 24),
}


def _wan_input(op: str) -> torch.Tensor:
    shape = WAN_CASES[op][0]
    return video(*shape[:1], *shape[2:]) if op == "encode" else torch.randn(shape, generator=torch.Generator()
                                                                              .manual_seed(4))


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_wan_oom_in_the_first_window_splits_in_place(wan, inject, op):
    x = _wan_input(op)
    tile = WAN_CASES[op][1]
    plan = qv.plan(wan, x.shape, tile=tile)
    seg = tiled_segments(plan)[0]  # the later ones have only 8x8 tiles here: already the smallest
    injector = inject(at(seg, biggest(plan, seg), chunk=0))
    out, warned = run_with_warnings(_tiled, wan, op, x, tile=tile)
    assert len(injector.failed) == 1
    assert len(warned) == 1 and "splitting it" in warned[0]
    assert max_diff(out, _untiled(wan, op, x)) <= TOL


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_wan_oom_in_a_later_window_starts_again(wan, inject, op):
    """The tile's causal caches came from the first window: the run starts over with smaller tiles."""
    x = _wan_input(op)
    tile = WAN_CASES[op][1]
    plan = qv.plan(wan, x.shape, tile=tile)
    seg = tiled_segments(plan)[0]
    injector = inject(at(seg, biggest(plan, seg), chunk=1))
    out, warned = run_with_warnings(_tiled, wan, op, x, tile=tile)
    assert len(injector.failed) == 1
    assert len(warned) == 1 and "starts again" in warned[0]
    assert max_diff(out, _untiled(wan, op, x)) <= TOL


def test_wan_whole_clip_tiles_split_after_a_later_chunk(wan, inject):
    """A segment that runs the whole clip tile by tile (no windows) drops the failed tile's caches
    and moments of its earlier chunks, and splits in place."""
    x = _wan_input("decode")
    plan = qv.plan(wan, x.shape, tile=24).with_window(None)
    seg = tiled_segments(plan)[0]
    injector = inject(at(seg, biggest(plan, seg), chunk=2))
    out, warned = run_with_warnings(qv.decode, wan, x, plan=plan)
    assert len(injector.failed) == 1 and len(warned) == 1 and "splitting it" in warned[0]
    assert max_diff(out, untiled_decode(wan, x)) <= TOL


def test_decode_frames_splits_in_the_first_window_and_refuses_later(wan, inject):
    z = _wan_input("decode")
    plan = qv.plan(wan, z.shape, tile=24)
    seg = tiled_segments(plan)[0]
    ti = biggest(plan, seg)
    inject(at(seg, ti, chunk=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.cat(list(qv.decode_frames(wan, z, tile=24)), dim=2)
    assert max_diff(out, untiled_decode(wan, z)) <= TOL

    before = model_state(wan)
    inject(at(seg, ti, chunk=1))
    got = []
    with pytest.raises(qv.OutOfMemoryError, match="cannot go back"):
        for frames in qv.decode_frames(wan, z, tile=24):
            got.append(frames)
    assert len(got) == 1  # the first window was yielded before the error
    assert model_state(wan) == before


def test_wan_exhausted_names_the_smallest_plan(wan, inject):
    x = _wan_input("decode")
    before = model_state(wan)
    inject(lambda *_: True, times=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(qv.OutOfMemoryError, match="smallest tile the model allows") as err:
            qv.decode(wan, x, tile=24)
    assert err.value.plan.tiles >= qv.plan(wan, x.shape, tile=24).tiles
    assert model_state(wan) == before


# --------------------------------------------------------------------------------------- the replanner


def test_replanner_keeps_done_tiles_and_covers_the_frame(sd):
    plan = qv.plan(sd, (1, 4, 12, 16), tile=64)
    seg = tiled_segments(plan)[0]
    later = max(tiled_segments(plan)[1:], key=lambda i: plan.segments[i].peak)
    replanner = Replanner(plan)
    assert replanner.layout(seg) == plan.segments[seg].layout  # nothing lowered: the plan's own layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = replanner.shrink(seg, 1)
    old = plan.segments[seg].layout
    assert new[:1] == old[:1] and len(new) > len(old)
    check_layout(new, *plan.segments[seg].size_out)
    assert replanner.layout(seg) == new  # fixed once run
    assert replanner.limit < plan.tile_limit
    assert plan.segments[later].peak > replanner.limit
    relaid = replanner.layout(later)  # a later segment is laid out under the lowered limit too
    check_layout(relaid, *plan.segments[later].size_out)
    assert len(relaid) > len(plan.segments[later].layout)


def test_subdivide_covers_an_offset_region_on_the_grid():
    """The split a replan makes of one tile: its pieces cover it exactly, on multiples of ``align``
    (where the tile's own edges allow), each fits or is ``align`` on a side."""
    core = Region((8, 48), (16, 80))
    pieces = subdivide(core, lambda r: r.area <= 200, align=8)
    covered = torch.zeros(48, 80, dtype=torch.int)
    for r in pieces:
        covered[r.y[0] : r.y[1], r.x[0] : r.x[1]] += 1
        assert r.area <= 200 or min(r.h, r.w) < 16
        assert all(v % 8 == 0 for v in (*r.y, *r.x))
    assert covered[8:48, 16:80].eq(1).all() and covered.sum() == core.area
    assert subdivide(core, lambda r: True, align=8) == [core]
