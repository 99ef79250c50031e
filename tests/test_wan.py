"""Exactness of tiled encode/decode on the 3-D causal VAEs (Wan 2.1, Qwen-Image) against the untiled model."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FIXTURES,
    max_diff,
    model_state,
    qwen_tiny,
    seeded,
    untiled_decode,
    untiled_encode,
    video,
    wan_tiny,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quadtree_vae as qv
from quadtree_vae.geometry import grid

TOL = 1e-4
# (tile, what it exercises) on a 40x56 frame: none of these divides it
TILES = [24, (24, 40), (24, 64), 200]


@pytest.fixture(scope="module", params=["wan", "qwen"])
def model(request, wan, qwen):
    return {"wan": wan, "qwen": qwen}[request.param]


@pytest.mark.parametrize("tile", TILES, ids=["24", "24x40", "strips", "larger-than-frame"])
@pytest.mark.parametrize("t,b", [(1, 2), (5, 1)])
def test_encode_equals_untiled(model, tile, t, b):
    x = video(b, t, 40, 56, seed=t + b)
    ref = untiled_encode(model, x)
    out = qv.encode(model, x, tile=tile)
    assert max_diff(out, ref) <= TOL


@pytest.mark.parametrize("tile", TILES, ids=["24", "24x40", "strips", "larger-than-frame"])
@pytest.mark.parametrize("t,b", [(1, 2), (2, 1)])
def test_decode_equals_untiled(model, tile, t, b):
    z = torch.randn(b, model.config.z_dim, t, 5, 7, generator=torch.Generator().manual_seed(t))
    ref = untiled_decode(model, z)
    out = qv.decode(model, z, tile=tile)
    assert out.shape == ref.shape == (b, 3, 1 + 4 * (t - 1), 40, 56)
    assert max_diff(out, ref) <= TOL


def test_small_budget_tiles_every_segment_and_stays_exact(wan):
    z = torch.randn(1, 4, 2, 6, 8, generator=torch.Generator().manual_seed(3))
    plan = qv.plan(wan, z.shape, budget="500KB")
    assert all(len(s.layout) > 1 for s in plan.segments if not s.is_global and s.size_out[0] > 6)
    assert max_diff(qv.decode(wan, z, plan=plan), untiled_decode(wan, z)) <= TOL
    x = video(1, 5, 48, 64)
    plan = qv.plan(wan, x.shape, budget="500KB")
    assert sum(len(s.layout) > 1 for s in plan.segments) >= 3
    assert max_diff(qv.encode(wan, x, plan=plan), untiled_encode(wan, x)) <= TOL


@st.composite
def random_layouts(draw, plan):
    """A random grid (unequal cells, any positions) for every tiled segment of ``plan``."""
    layouts = {}
    for i, seg in enumerate(plan.segments):
        if seg.is_global:
            continue
        h, w = seg.size_out
        ys = draw(st.lists(st.integers(1, h - 1), max_size=3)) if h > 1 else []
        xs = draw(st.lists(st.integers(1, w - 1), max_size=3)) if w > 1 else []
        layouts[i] = grid(h, w, ys, xs)
    return plan.with_layouts(layouts)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), t=st.sampled_from([1, 2]), b=st.sampled_from([1, 2]), which=st.sampled_from(["wan", "qwen"]))
def test_random_layouts_decode(data, t, b, which, wan, qwen):
    model = {"wan": wan, "qwen": qwen}[which]
    z = torch.randn(b, model.config.z_dim, t, 4, 6, generator=torch.Generator().manual_seed(b * 10 + t))
    plan = data.draw(random_layouts(qv.plan(model, z.shape)))
    assert max_diff(qv.decode(model, z, plan=plan), untiled_decode(model, z)) <= TOL


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), t=st.sampled_from([1, 5]), b=st.sampled_from([1, 2]), which=st.sampled_from(["wan", "qwen"]))
def test_random_layouts_encode(data, t, b, which, wan, qwen):
    model = {"wan": wan, "qwen": qwen}[which]
    x = video(b, t, 32, 48, seed=b + t)
    plan = data.draw(random_layouts(qv.plan(model, x.shape)))
    assert max_diff(qv.encode(model, x, plan=plan), untiled_encode(model, x)) <= TOL


@pytest.mark.parametrize("cls", ["wan", "qwen"])
def test_full_default_config_at_small_size(cls):
    """The released widths (base_dim 96, z_dim 16) with random weights, several tiles, image and video."""
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    model = seeded(AutoencoderKLWan if cls == "wan" else AutoencoderKLQwenImage, 5)
    for t in (1, 5) if cls == "wan" else (1,):
        x = video(1, t, 32, 48, seed=t)
        ref = untiled_encode(model, x)
        assert max_diff(qv.encode(model, x, tile=24), ref) <= TOL
        z = ref[:, :, :2] if t > 1 else ref
        assert max_diff(qv.decode(model, z, tile=(24, 32)), untiled_decode(model, z)) <= TOL


def test_images_as_4d_tensors(wan):
    x = video(2, 1, 40, 56)[:, :, 0]
    z = qv.encode(wan, x, tile=24)
    assert z.shape == (2, 4, 5, 7)
    assert max_diff(z, untiled_encode(wan, x[:, :, None])[:, :, 0]) <= TOL
    y = qv.decode(wan, z, tile=24, output_device="cpu")
    assert y.shape == (2, 3, 40, 56)
    assert max_diff(y, untiled_decode(wan, z[:, :, None])[:, :, 0]) <= TOL


def test_original_wan_release_fixture():
    """Weights in the original Wan 2.1 layout; outputs computed by the original implementation."""
    from safetensors.torch import load_file

    from quadtree_vae.loading import load_vae

    folder = FIXTURES / "wan21-original-tiny"
    vae = load_vae(folder / "model.safetensors")
    cases = load_file(folder / "cases.safetensors")
    for name in ("1x64x80", "9x64x80"):
        x = cases[f"video_{name}"]
        assert max_diff(qv.encode(vae, x, tile=32), cases[f"mu_{name}"]) <= TOL + 5.3e-6
        y = qv.decode(vae, cases[f"z_{name}"], tile=(32, 48))
        assert max_diff(y, cases[f"decoded_{name}"].clamp(-1, 1)) <= TOL + 5.3e-6


def test_model_is_left_as_it_was_also_after_an_error(wan):
    before = model_state(wan)
    x = video(1, 5, 32, 48)
    qv.encode(wan, x, tile=24)
    assert model_state(wan) == before

    calls = []

    def fail_midway(done, total):
        calls.append(done)
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qv.decode(wan, torch.randn(1, 4, 2, 4, 6), tile=24, progress=fail_midway)
    assert model_state(wan) == before
    # the model's own untiled path still works afterwards, unaffected
    assert max_diff(untiled_encode(wan, x), untiled_encode(wan_tiny(), x)) == 0


def test_working_memory_follows_the_tile_not_the_frame(wan):
    """The largest activation a block sees stays put when the frame grows 4x; untiled, it grows 4x."""
    largest = []

    def record(module, args):
        largest[-1] = max(largest[-1], args[0].numel() // args[0].shape[2])  # per frame

    hooks = [m.register_forward_pre_hook(record) for m in wan.modules() if isinstance(m, torch.nn.Conv3d)]
    try:
        for side in (128, 256):
            largest.append(0)
            qv.decode(wan, torch.randn(1, 4, 1, side // 8, side // 8), tile=32)
        largest.append(0)
        untiled_decode(wan, torch.randn(1, 4, 1, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    tiled_128, tiled_256, untiled_256 = largest
    assert tiled_256 <= 1.5 * tiled_128
    assert tiled_256 * 10 <= untiled_256


def test_progress_counts_tiles_times_chunks(qwen):
    seen = []
    qv.decode(qwen, torch.randn(1, 4, 3, 4, 6), tile=24, progress=lambda d, t: seen.append((d, t)))
    total = seen[0][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == list(range(total + 1))


def test_qwen_and_wan_from_the_same_weights_agree():
    wan = wan_tiny(seed=4)
    qwen = qwen_tiny(seed=4, dim_mult=[1, 2, 4, 4])
    qwen.load_state_dict(wan.state_dict())
    x = video(1, 5, 32, 48)
    assert max_diff(qv.encode(qwen, x, tile=24), qv.encode(wan, x, tile=24)) <= TOL
