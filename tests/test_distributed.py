"""Tile-parallel runs: 2 and 3 gloo ranks under torchrun on 127.0.0.1 give the untiled model's result."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import max_diff, torchrun, untiled_decode, untiled_encode
from dist_worker import cases

import quadtree_vae as qv
from quadtree_vae.distributed import _box, owners, readers, share, spread
from quadtree_vae.engine import Step
from quadtree_vae.geometry import Region, check_layout, grid, same

TOL = 1e-4


def launch(world: int, out: Path) -> list[dict]:
    """Run tests/dist_worker.py on ``world`` ranks under torchrun; their results."""
    done = torchrun(Path(__file__).with_name("dist_worker.py"), [str(out)], ranks=world)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def references():
    refs = {}
    models = {}
    with torch.no_grad():
        for name, (build, op, x, _) in cases().items():
            vae = models.setdefault(build, build())
            refs[name] = untiled_encode(vae, x) if op.startswith("encode") else untiled_decode(vae, x)
    return refs


@pytest.mark.parametrize("world", [2, 3])
def test_tile_parallel_equals_untiled_on_every_rank(world, references, tmp_path):
    ranks = launch(world, tmp_path)
    for r, saved in enumerate(ranks):
        for name, (_, _, _, opts) in cases().items():
            got = saved["results"][name]
            if opts.get("dst") == 0 and r != 0:
                assert got is None, f"{name}: rank {r} got a result meant for rank 0 only"
                continue
            assert max_diff(got, references[name]) <= TOL, (name, r)
        assert saved["received"] > 0
        assert "different calls" in saved["results"]["mismatch"]


def test_layouts_are_split_so_every_rank_has_a_fair_share():
    one = (Region((0, 40), (0, 64)),)
    for n in (2, 3, 5):
        layout = spread(one, n, (8, 8))
        check_layout(layout, 40, 64)
        assert len(layout) % n == 0 and all(r.h == 40 for r in layout)  # strips along the long side
        assert all(r.x[0] % 8 == 0 for r in layout)
    for side in range(1, 40):  # sides that do not divide: strips still cover the frame exactly
        for n in (2, 3):
            check_layout(spread((Region((0, side), (0, side)),), n, (8, 8)), side, side)
    three = grid(30, 30, [10, 20])
    assert len(three) == 3 and len(spread(three, 2)) == 6  # 3 tiles on 2 ranks: cut each in two
    many = grid(90, 90, range(10, 90, 10))
    assert spread(many, 2) == many  # 9 tiles on 2 ranks: enough to balance as they are


def test_owners_balance_area_and_cover_each_tile_once():
    layout = grid(40, 40, [10, 30], [20])  # unequal tiles
    own = owners(layout, 3)
    assert own == owners(layout, 3) and set(own) == {0, 1, 2}
    area = [sum(t.area for t, r in zip(layout, own) if r == k) for k in range(3)]
    assert max(area) - min(area) <= max(t.area for t in layout)
    assert share(layout, None) == list(layout)


def test_without_an_initialised_group_a_group_is_an_error(sd):
    with pytest.raises(qv.InvalidInputError, match="init_process_group"):
        qv.decode(sd, torch.randn(1, 4, 4, 4), group=qv.Ranks())


def test_ranks_exchange_only_the_halo_strips_their_next_tiles_read():
    steps = [Step(f"conv{i}", lambda x, ctx: x, (1, 1), same(1)) for i in range(3)]
    strips = grid(16, 16, [8])
    segs = [SimpleNamespace(start=i, stop=i + 1, is_global=False, layout=strips, size_in=(16, 16)) for i in range(3)]
    wanted = readers(steps, segs, 0, 2)
    assert wanted == [[Region((0, 9), (0, 16))], [Region((7, 16), (0, 16))]]
    assert _box(strips[0], wanted[1]) == Region((7, 8), (0, 16))  # one row of rank 0's core goes to rank 1
    steps[2].skip = 1  # a residual from the input of segment 1, read at the cores of segment 2
    assert readers(steps, segs, 0, 2) == [[Region((0, 9), (0, 16)), strips[0]], [Region((7, 16), (0, 16)), strips[1]]]
    segs[1].is_global = True
    assert readers(steps, segs, 0, 2) is None  # attention reads everything
