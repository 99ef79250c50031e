"""Time windows and the streaming API: results equal the untiled model for any window, tile layout
and frame count; what a plan holds does not grow with the clip."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import max_diff, seeded, untiled_decode, untiled_encode, video
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quadtree_vae as qv
from quadtree_vae import engine
from quadtree_vae.engine import Network, Run, Step, execute
from quadtree_vae.geometry import full, grid

TOL = 1e-4
H, W = 16, 24  # pixels: latent 2x3


@pytest.fixture(scope="module", params=["wan", "qwen"])
def model(request, wan, qwen):
    return {"wan": wan, "qwen": qwen}[request.param]


def two_columns(plan: qv.Plan) -> qv.Plan:
    """Every tiled segment cut into two unequal columns, so tiles meet inside the frame."""
    return plan.with_layouts({
        i: grid(*s.size_out, xs=[max(1, s.size_out[1] // 3)]) for i, s in enumerate(plan.segments)
        if not s.is_global and s.size_out[1] > 1
    })


def windows_for(n: int) -> list[int]:
    """Window lengths 1, 2, 3 and one that does not divide the ``n`` latent frames."""
    return [1, 2, 3, next(w for w in range(4, n + 5) if n % w)]


@pytest.mark.parametrize("t", [1, 5, 9, 13, 17, 21])
def test_encode_in_windows_equals_untiled(model, t):
    x = video(1, t, H, W, seed=t)
    ref = untiled_encode(model, x)
    plan = two_columns(qv.plan(model, x.shape))
    for window in windows_for(ref.shape[2]):
        assert max_diff(qv.encode(model, x, plan=plan.with_window(window)), ref) <= TOL, window


@pytest.mark.parametrize("t", [1, 5, 9, 13, 17, 21])
def test_decode_in_windows_equals_untiled(model, t):
    """The latent of a ``t``-frame clip decodes back to ``t`` frames."""
    n = 1 + (t - 1) // 4
    z = torch.randn(1, 4, n, H // 8, W // 8, generator=torch.Generator().manual_seed(t))
    ref = untiled_decode(model, z)
    assert ref.shape[2] == t
    plan = two_columns(qv.plan(model, z.shape))
    for window in windows_for(n):
        assert max_diff(qv.decode(model, z, plan=plan.with_window(window)), ref) <= TOL, window


def test_encode_frames_takes_irregular_chunks(model):
    x = video(2, 13, H, W, seed=3)
    sizes = [1, 3, 2, 7]
    pieces = torch.split(x, sizes, dim=2)
    got = list(qv.encode_frames(model, iter(pieces), window=2))
    assert [g.shape[2] for g in got] == [2, 2]  # latent frames, window by window
    assert max_diff(torch.cat(got, dim=2), untiled_encode(model, x)) <= TOL
    frames = [x[:, :, i] for i in range(13)]  # single (B, 3, H, W) frames, as read from a file
    plan = two_columns(qv.plan(model, (2, 3, 81, H, W)))  # a stream's plan is made for any length
    got = torch.cat(list(qv.encode_frames(model, frames, plan=plan)), dim=2)
    assert max_diff(got, untiled_encode(model, x)) <= TOL


def test_decode_frames_yields_windows_as_they_finish(model):
    z = torch.randn(1, 4, 5, H // 8, W // 8, generator=torch.Generator().manual_seed(1))
    got = list(qv.decode_frames(model, z, window=2))
    assert [g.shape[2] for g in got] == [1 + 4, 8, 4]  # the first latent frame makes 1 frame, the others 4
    assert max_diff(torch.cat(got, dim=2), untiled_decode(model, z)) <= TOL


@pytest.mark.parametrize("policy", ["trim", "pad"])
def test_stream_end_follows_the_frame_rule_like_encode(wan, policy):
    x = video(1, 11, H, W, seed=5)  # 1 + 4k + 2
    got = torch.cat(list(qv.encode_frames(wan, torch.split(x, [4, 4, 3], dim=2), frames=policy)), dim=2)
    assert max_diff(got, qv.encode(wan, x, frames=policy)) <= TOL


def test_stream_that_breaks_the_frame_rule_raises_at_its_end(wan):
    x = video(1, 7, H, W, seed=6)
    stream = qv.encode_frames(wan, torch.split(x, [2, 5], dim=2))
    got = torch.cat([next(stream), next(stream)], dim=2)  # whole chunks are encoded before the end is known
    assert max_diff(got, untiled_encode(wan, x[:, :, :5])) <= TOL
    with pytest.raises(qv.InvalidInputError, match="ended after 7 frames.*frames='pad'"):
        next(stream)


def test_bad_streams_are_refused(wan, sd):
    x = video(1, 5, H, W)
    with pytest.raises(qv.InvalidInputError, match="no frames"):
        next(qv.encode_frames(wan, []))
    with pytest.raises(qv.InvalidInputError, match="does not match"):
        list(qv.encode_frames(wan, [x, video(1, 4, H, 2 * W)]))
    with pytest.raises(qv.InvalidInputError, match="video VAE"):
        next(qv.decode_frames(sd, torch.randn(1, 4, 2, 2)))
    with pytest.raises(qv.InvalidInputError, match="window"):
        qv.plan(wan, x.shape).with_window(0)
    with pytest.raises(qv.InvalidInputError, match="does not run in time windows"):
        qv.plan(sd, (1, 3, 64, 64)).with_window(2)


def test_gradients_stay_on_between_yields(wan):
    z = torch.randn(1, 4, 3, 2, 4)
    stream = qv.decode_frames(wan, z)
    next(stream)
    assert torch.is_grad_enabled()
    stream.close()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), t=st.sampled_from([2, 3]), which=st.sampled_from(["wan", "qwen"]))
def test_random_windows_and_layouts_decode(data, t, which, wan, qwen):
    model = {"wan": wan, "qwen": qwen}[which]
    z = torch.randn(1, 4, t, 3, 4, generator=torch.Generator().manual_seed(t))
    plan = qv.plan(model, z.shape).with_window(data.draw(st.sampled_from([None, 1, 2, 3])))
    layouts = {}
    for i, s in enumerate(plan.segments):
        if not s.is_global:
            h, w = s.size_out
            layouts[i] = grid(h, w, data.draw(st.lists(st.integers(1, h - 1), max_size=2)),
                              data.draw(st.lists(st.integers(1, w - 1), max_size=2)))
    assert max_diff(qv.decode(model, z, plan=plan.with_layouts(layouts)), untiled_decode(model, z)) <= TOL


def test_full_default_wan_streams_at_small_size():
    from diffusers import AutoencoderKLWan

    vae = seeded(AutoencoderKLWan, 5)
    x = video(1, 5, H, 48, seed=2)  # two tiles of 24 px across
    ref = untiled_encode(vae, x)
    got = torch.cat(list(qv.encode_frames(vae, torch.split(x, [2, 3], dim=2), tile=24, window=1)), dim=2)
    assert max_diff(got, ref) <= TOL
    y = torch.cat(list(qv.decode_frames(vae, ref, tile=24, window=1)), dim=2)
    assert max_diff(y, untiled_decode(vae, ref)) <= TOL


# ------------------------------------------------------------------------------------------ engine


def test_first_marks_only_the_first_chunk_of_the_clip_and_caches_carry_over():
    """A step that counts its chunks in its cache: windows must not restart either."""
    seen = []

    def count(x, ctx):
        ctx.cache[0] = (ctx.cache[0] or 0) + 1
        seen.append((ctx.first, ctx.cache[0]))
        return x

    net = Network("counter", [Step("count", count, (1, 1), cache_slots=1)], 1, chunks=lambda t: [1] * t)

    class Seg:
        start, stop, is_global, layout, window, size_out = 0, 1, False, (full(2, 2),), 2, (2, 2)

    y = execute(net, [Seg()], torch.zeros(1, 1, 5, 2, 2), Run(torch.device("cpu"), torch.device("cpu"),
                                                               torch.device("cpu")))
    assert y.shape == (1, 1, 5, 2, 2)
    assert seen == [(True, 1), (False, 2), (False, 3), (False, 4), (False, 5)]


def test_caches_of_the_last_window_are_dropped_tile_by_tile(monkeypatch):
    """No window follows the last one of a clip of known length, so no tile keeps its caches for it
    (one image: one tile's caches alive, not every tile's); a stream of unknown length keeps them."""
    kept = []
    monkeypatch.setattr(engine.Caches, "put", lambda self, key, caches: kept.append(key))

    def count(x, ctx):
        ctx.cache[0] = (ctx.cache[0] or 0) + 1
        return x

    net = Network("counter", [Step("count", count, (1, 1), cache_slots=1)], 1, chunks=lambda t: [1] * t)

    class Seg:
        start, stop, is_global, layout, window, size_out = 0, 1, False, grid(2, 2, xs=[1]), 2, (2, 2)

    cpu = torch.device("cpu")
    x = torch.zeros(1, 1, 5, 2, 2)
    execute(net, [Seg()], x, Run(cpu, cpu, cpu))
    assert kept == [(0, 0), (0, 1), (0, 0), (0, 1)]  # windows from chunks 0 and 2; none from the last (4)
    kept.clear()
    execute(net, [Seg()], x[:, :, :1], Run(cpu, cpu, cpu))
    assert kept == []
    kept.clear()
    list(engine.stream(net, [Seg()], iter(x.split(1, dim=2)), Run(cpu, cpu, cpu)))
    assert kept == [(0, 0), (0, 1)] * 3


def test_a_step_cache_is_emptied_once_the_last_chunk_has_run():
    """Caches no later window needs are let go step by step within a tile on its last chunk (a
    single image holds one step's caches at a time); on earlier chunks they carry over."""
    refs, alive = [], []

    def store(x, ctx):
        value = torch.ones(1)
        ctx.cache[0] = value
        refs.append(weakref.ref(value))
        return x

    def check(x, ctx):
        alive.append(refs[-1]() is not None)
        return x

    steps = [Step("store", store, (1, 1), cache_slots=1), Step("check", check, (1, 1))]
    net = Network("store", steps, 1, chunks=lambda t: [1] * t)

    class Seg:
        start, stop, is_global, layout, window, size_out = 0, 2, False, (full(2, 2),), None, (2, 2)

    cpu = torch.device("cpu")
    execute(net, [Seg()], torch.zeros(1, 1, 3, 2, 2), Run(cpu, cpu, cpu))
    assert alive == [True, True, False]


# ------------------------------------------------------------------------------------------- plans


def test_held_bytes_do_not_depend_on_the_clip_length(wan):
    held = {t: qv.plan(wan, (1, 4, t, 8, 8), tile=32).held_bytes for t in (3, 21, 61)}
    assert held[3] == held[21] == held[61] > 0
    held = {t: qv.plan(wan, (1, 3, t, 64, 64), tile=32).held_bytes for t in (9, 81, 241)}
    assert held[9] == held[81] == held[241] > 0


@pytest.fixture(scope="module")
def wan_full():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):  # plans read only the modules' shapes
        return AutoencoderKLWan()


def test_720p_held_bytes_flat_in_clip_length(wan_full):
    for tile in (512, None):
        short = qv.plan(wan_full, (1, 16, 21, 90, 160), tile=tile, device="cpu")
        long = qv.plan(wan_full, (1, 16, 61, 90, 160), tile=tile, device="cpu")
        assert abs(long.held_bytes - short.held_bytes) < 0.1 * short.held_bytes
        assert short.window == long.window == 1 and short.cache_bytes > 0
    text = short.describe()
    assert "time windows of 1 latent frame(s) of 21" in text and "causal caches" in text and "held" in text


@pytest.mark.parametrize("shape", [(1, 3, 81, 720, 1280), (1, 16, 21, 90, 160)], ids=["encode", "decode"])
def test_720p_81_frames_fit_4gb_on_cpu(wan_full, shape):
    plan = qv.plan(wan_full, shape, budget="4GB", device="cpu")
    assert plan.peak <= 4 * 2**30
    assert "run the whole clip one tile at a time" in plan.describe()  # below the caches' floor
    assert 1.0 < plan.overhead < 2.5


def test_caches_wait_on_the_host_when_the_gpu_is_short(wan_full):
    """Plans only (no GPU needed): on CUDA, caches that do not fit the budget wait in host memory,
    and the window grows so that they move less often."""
    plan = qv.plan(wan_full, (1, 16, 21, 90, 160), budget="8GB", device="cuda")
    assert plan.cache_at == "cpu" and plan.cache_bytes > 4 * 2**30
    assert plan.window > 1 and plan.peak <= 8 * 2**30
    assert "caches on cpu" in plan.describe()
