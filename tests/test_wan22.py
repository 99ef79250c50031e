"""Exactness of tiled encode/decode on the residual causal VAEs: Wan 2.2 (``AutoencoderKLWan`` with
``is_residual=True, patch_size=2``) and Qwen-Image 2.1 (``AutoencoderKLQwenImage21``), against the untiled model."""

from __future__ import annotations

import pytest
import torch
from conftest import TI2V, max_diff, random_layouts, seeded, untiled_decode, untiled_encode, video, wan22_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quadtree_vae as qv
from quadtree_vae import adapters, planner
from quadtree_vae.errors import InvalidInputError
from quadtree_vae.geometry import Aligned, Conv, Region, chain, grid, halo_regions, same, sizes_along

TOL = 1e-4
# (tile, what it exercises) on a 48x80 frame (latent 3x5): none of these divides it
TILES = [48, (48, 64), (48, 320), 400]
TILE_IDS = ["48", "48x64", "strips", "larger-than-frame"]
def qwen21_tiny(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLQwenImage21

    config = dict(base_dim=8, decoder_base_dim=8, z_dim=8, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    config.update(overrides)
    return seeded(AutoencoderKLQwenImage21, seed, **config)


def rgba(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A one-frame RGBA clip (B, 4, 1, H, W)."""
    return torch.cat([video(b, 1, h, w, seed), video(b, 1, h, w, seed + 1)[:, :1]], dim=1)


@pytest.fixture(scope="module")
def wan22():
    return wan22_tiny()


@pytest.fixture(scope="module")
def qwen21():
    return qwen21_tiny(seed=2)


@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
@pytest.mark.parametrize("t,b", [(1, 2), (5, 1)])
def test_wan22_encode_equals_untiled(wan22, tile, t, b):
    x = video(b, t, 48, 80, seed=t + b)
    out = qv.encode(wan22, x, tile=tile)
    assert out.shape == (b, 8, 1 + (t - 1) // 4, 3, 5)
    assert max_diff(out, untiled_encode(wan22, x)) <= TOL


@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
@pytest.mark.parametrize("t,b", [(1, 2), (2, 1)])
def test_wan22_decode_equals_untiled(wan22, tile, t, b):
    z = torch.randn(b, 8, t, 3, 5, generator=torch.Generator().manual_seed(t))
    out = qv.decode(wan22, z, tile=tile)
    assert out.shape == (b, 3, 1 + 4 * (t - 1), 48, 80)
    assert max_diff(out, untiled_decode(wan22, z)) <= TOL


@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_qwen21_equals_untiled(qwen21, tile, op):
    if op == "encode":
        x = rgba(2, 48, 80)
        out, ref = qv.encode(qwen21, x, tile=tile), untiled_encode(qwen21, x)
    else:
        z = torch.randn(2, 8, 1, 3, 5, generator=torch.Generator().manual_seed(1))
        out, ref = qv.decode(qwen21, z, tile=tile), untiled_decode(qwen21, z)
        assert out.shape == (2, 4, 1, 48, 80)
    assert max_diff(out, ref) <= TOL


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), op=st.sampled_from(["encode", "decode"]), t=st.sampled_from([1, 5]),
       which=st.sampled_from(["wan22", "qwen21"]))
def testrandom_layouts(data, op, t, which, wan22, qwen21):
    model = {"wan22": wan22, "qwen21": qwen21}[which]
    t = 1 if which == "qwen21" else t
    if op == "encode":
        x = rgba(1, 32, 48, seed=t) if which == "qwen21" else video(1, t, 32, 48, seed=t)
        plan = random_layouts(data, qv.plan(model, x.shape, op="encode"))
        assert max_diff(qv.encode(model, x, plan=plan), untiled_encode(model, x)) <= TOL
    else:
        z = torch.randn(1, 8, 1 + (t - 1) // 4, 2, 3, generator=torch.Generator().manual_seed(t))
        plan = random_layouts(data, qv.plan(model, z.shape, op="decode"))
        assert max_diff(qv.decode(model, z, plan=plan), untiled_decode(model, z)) <= TOL


def test_small_budget_tiles_and_stays_exact(wan22):
    """The planner's own choice under a small budget (encode: several levels tiled; decode: the
    windowed planner tiles the full-resolution run). Every level tiled is test_random_layouts'."""
    x = video(1, 1, 64, 96)
    plan = qv.plan(wan22, x.shape, budget="300KB")
    assert sum(len(s.layout) > 1 for s in plan.segments) >= 2
    assert max_diff(qv.encode(wan22, x, plan=plan), untiled_encode(wan22, x)) <= TOL
    z = torch.randn(1, 8, 2, 6, 8, generator=torch.Generator().manual_seed(3))
    plan = qv.plan(wan22, z.shape, budget="10MB")
    assert sum(len(s.layout) > 1 for s in plan.segments) >= 1 and plan.peak <= 10 * 2**20
    assert max_diff(qv.decode(wan22, z, plan=plan), untiled_decode(wan22, z)) <= TOL


def test_images_as_4d_tensors(wan22):
    x = video(2, 1, 48, 80)[:, :, 0]
    z = qv.encode(wan22, x, tile=48)
    assert z.shape == (2, 8, 3, 5)
    assert max_diff(z, untiled_encode(wan22, x[:, :, None])[:, :, 0]) <= TOL
    y = qv.decode(wan22, z, tile=48)
    assert max_diff(y, untiled_decode(wan22, z[:, :, None])[:, :, 0]) <= TOL


def test_facts():
    from diffusers import AutoencoderKLQwenImage21

    wan = adapters.facts(wan22_tiny())
    assert (wan.spatial_factor, wan.temporal_factor, wan.in_channels, wan.latent_channels) == (16, 4, 3, 8)
    assert (wan.patch_size, wan.max_frames) == (2, None)
    with torch.device("meta"):
        qwen = adapters.facts(AutoencoderKLQwenImage21())
    assert (qwen.spatial_factor, qwen.in_channels, qwen.latent_channels, qwen.max_frames) == (16, 4, 64, 1)


def test_qwen21_refuses_more_than_one_frame_before_any_work(qwen21):
    with pytest.raises(InvalidInputError, match="one frame"):
        qv.plan(qwen21, (1, 4, 5, 32, 32), op="encode")
    with pytest.raises(InvalidInputError, match="one frame"):
        qv.plan(qwen21, (1, 8, 2, 2, 2), op="decode")


def test_patchify_stays_with_the_first_convs_and_the_factor_is_16(wan22):
    """Patchify only reshapes: no segment boundary next to it, so the tile bounds real work."""
    plan = qv.plan(wan22, (1, 3, 1, 64, 96), tile=48)
    assert plan.segments[0].names[:2] == ("patchify", "encoder.conv_in")
    dec = qv.plan(wan22, (1, 8, 1, 4, 6), tile=48)
    assert dec.segments[-1].names[-3:] == ("decoder.conv_out", "unpatchify", "clamp")
    net = adapters.wan.encoder(wan22)
    assert net.spatial_factor == 16


def test_residual_down_level_reads_whole_cells():
    """The average-pool shortcut reads 2x2 cells: a down level's input region starts and ends even."""
    main = chain(same(1), same(1), Conv(3, 2, (0, 1)))
    fp = Aligned(main, 2)
    assert main.need((3, 5), 20) == (4, 13)
    assert fp.need((3, 5), 20) == (4, 14)
    assert fp.need((0, 10), 20) == (0, 20)
    for core in [(0, 1), (1, 4), (4, 5), (7, 10)]:
        regions = halo_regions([same(1), fp], Region(core, core), (20, 20))
        assert regions[1].y[0] % 2 == 0 and regions[1].y[1] % 2 == 0
    assert sizes_along([fp], (20, 20))[-1] == (10, 10)


@pytest.fixture(scope="module")
def ti2v():
    from diffusers import AutoencoderKLWan

    return seeded(AutoencoderKLWan, 5, **TI2V)


@pytest.mark.parametrize("t", [1, 5])
def test_wan22_full_ti2v_config_at_small_size(ti2v, t):
    """The released widths (base_dim 160, decoder_base_dim 256, z_dim 48) with random weights, unequal tiles."""
    x = video(1, t, 48 if t == 1 else 32, 64 if t == 1 else 48, seed=t)
    ref = untiled_encode(ti2v, x)
    plan = qv.plan(ti2v, x.shape, op="encode", tile=48)
    h, w = plan.segments[0].size_out  # patchify .. the first down level
    plan = plan.with_layouts({0: grid(h, w, [h // 3], [w // 4, w // 2 + 1])})
    assert max_diff(qv.encode(ti2v, x, plan=plan), ref) <= TOL
    z = ref[:, :, :2]
    assert max_diff(qv.decode(ti2v, z, tile=(48, 32)), untiled_decode(ti2v, z)) <= TOL


def test_qwen21_default_config_at_small_size():
    from diffusers import AutoencoderKLQwenImage21

    model = seeded(AutoencoderKLQwenImage21, 6)
    x = rgba(1, 32, 48)
    ref = untiled_encode(model, x)
    assert max_diff(qv.encode(model, x, tile=32), ref) <= TOL
    assert max_diff(qv.decode(model, ref, tile=32), untiled_decode(model, ref)) <= TOL


@pytest.mark.parametrize("t", [1, 9])
def test_up_level_shortcut_inside_one_segment(wan22, monkeypatch, t):
    """With no cuts but the forced ones, a whole up level (resnets, upsampler and its ``DupUp3D``
    join) runs inside one tiled segment: the join reads the level's input from the tile's own
    input, at half the output's region (elsewhere the plan cuts before the upsampler)."""
    forced = planner.cut_points
    monkeypatch.setattr(planner, "cut_points", lambda net, mode, resolution=True: forced(net, mode, False))
    z = torch.randn(1, 8, 1 + (t - 1) // 4, 6, 8, generator=torch.Generator().manual_seed(t))
    plan = qv.plan(wan22, z.shape, op="decode")
    steps = adapters.adapter_for(wan22).decoder(wan22).steps
    names = [[step.name for step in steps[s.start : s.stop]] for s in plan.segments]
    assert any("decoder.up_blocks.1.resnets.0" in n and "decoder.up_blocks.1.upsampler" in n for n in names)
    plan = plan.with_layouts({i: grid(*s.size_out, ys=[s.size_out[0] // 3], xs=[s.size_out[1] // 2 + 1])
                              for i, s in enumerate(plan.segments) if not s.is_global})
    assert max_diff(qv.decode(wan22, z, plan=plan), untiled_decode(wan22, z)) <= TOL

