"""Exactness of tiled encode/decode on the SD-family 2-D VAEs (AutoencoderKL), GroupNorm across tiles."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FIXTURES,
    flux2_tiny,
    max_diff,
    model_state,
    random_layouts,
    sd_tiny,
    seeded,
    untiled_decode,
    untiled_encode,
    video,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quadtree_vae as qv

TOL = 1e-4
TILES = [16, (24, 40), (16, 64), 200]
CONFIGS = {
    "sd": {},  # 4-channel latent, quant convs, mid attention
    "flux": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
    "no-attention": dict(mid_block_add_attention=False, layers_per_block=2, norm_num_groups=4,
                         block_out_channels=(8, 16, 16, 24)),
    "wide-groups": dict(block_out_channels=(16, 32, 64, 64), norm_num_groups=16, latent_channels=16),
}


FLUX2_CONFIGS = {  # AutoencoderKLFlux2: the same encoder/decoder, another class
    "flux2": {},
    "flux2-no-quant-convs": dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS) + sorted(FLUX2_CONFIGS))
def model(request):
    if request.param in FLUX2_CONFIGS:
        return flux2_tiny(seed=len(request.param), **FLUX2_CONFIGS[request.param])
    return sd_tiny(seed=len(request.param), **CONFIGS[request.param])


def image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return video(b, 1, h, w, seed)[:, :, 0]


@pytest.mark.parametrize("tile", TILES, ids=["16", "24x40", "strips", "larger-than-frame"])
@pytest.mark.parametrize("b", [1, 2])
def test_encode_equals_untiled(model, tile, b):
    x = image(b, 40, 56, seed=b)
    assert max_diff(qv.encode(model, x, tile=tile), untiled_encode(model, x)) <= TOL


@pytest.mark.parametrize("tile", TILES, ids=["16", "24x40", "strips", "larger-than-frame"])
@pytest.mark.parametrize("b", [1, 2])
def test_decode_equals_untiled(model, tile, b):
    c = model.config.latent_channels
    z = torch.randn(b, c, 5, 7, generator=torch.Generator().manual_seed(b))
    out = qv.decode(model, z, tile=tile)
    assert out.shape == (b, 3, 40, 56)
    assert max_diff(out, untiled_decode(model, z)) <= TOL


def test_every_groupnorm_starts_a_segment_in_exact_mode(sd):
    plan = qv.plan(sd, (1, 4, 8, 8), tile=16)
    net_norm_steps = [s for s in plan.segments if s.names[0].endswith(("conv1", "conv2", "conv_out"))]
    assert len(net_norm_steps) == 2 * 2 * 3 + 2 * 4 + 1  # two halves per resnet, then the head
    assert all(len(s.names) <= 2 for s in plan.segments)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), b=st.sampled_from([1, 2]), op=st.sampled_from(["encode", "decode"]))
def test_random_layouts(data, b, op, sd):
    x = image(b, 32, 48, seed=b) if op == "encode" else torch.randn(b, 4, 4, 6)
    plan = qv.plan(sd, x.shape, op=op)
    plan = random_layouts(data, plan)
    if op == "encode":
        assert max_diff(qv.encode(sd, x, plan=plan), untiled_encode(sd, x)) <= TOL
    else:
        assert max_diff(qv.decode(sd, x, plan=plan), untiled_decode(sd, x)) <= TOL


def test_full_sd_config_at_small_size():
    from diffusers import AutoencoderKL

    vae = seeded(AutoencoderKL, 3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    x = image(1, 32, 48)
    z = untiled_encode(vae, x)
    assert max_diff(qv.encode(vae, x, tile=16), z) <= TOL
    assert max_diff(qv.decode(vae, z, tile=(16, 24)), untiled_decode(vae, z)) <= TOL


@pytest.mark.parametrize("name", ["sd-ldm-tiny", "flux-ldm-tiny"])
def test_ldm_release_fixtures(name):
    """Weights in the ldm/sgm file layout; outputs of the sgm implementation (attention kernels differ: 5.3e-6)."""
    from safetensors.torch import load_file

    from quadtree_vae.loading import load_vae

    vae = load_vae(FIXTURES / name / "model.safetensors")
    cases = load_file(FIXTURES / name / "cases.safetensors")
    size = next(k for k in cases if k.startswith("image_")).removeprefix("image_")
    assert max_diff(qv.encode(vae, cases[f"image_{size}"], tile=32), cases[f"mean_{size}"]) <= TOL + 5.3e-6
    assert max_diff(qv.decode(vae, cases[f"z_{size}"], tile=(32, 24)), cases[f"decoded_{size}"]) <= TOL + 5.3e-6


def test_fast_mode_estimates_statistics_from_a_downscaled_pass(sd):
    x = image(1, 512, 512)
    exact = qv.encode(sd, x, tile=128)
    assert max_diff(exact, untiled_encode(sd, x)) <= TOL
    before = model_state(sd)
    fast = qv.encode(sd, x, tile=128, mode="fast")
    assert model_state(sd) == before  # the statistics hooks are gone
    err = max_diff(fast, exact)
    assert 0 < err < 0.5 * exact.abs().max().item()  # an approximation, not a different picture
    plan = qv.plan(sd, x.shape, tile=128, mode="fast")
    assert len(plan.segments) < len(qv.plan(sd, x.shape, tile=128).segments)  # no cut at the norms


def test_fast_mode_is_exact_when_the_frame_is_small(sd):
    x = image(2, 40, 56)
    assert max_diff(qv.encode(sd, x, tile=24, mode="fast"), untiled_encode(sd, x)) <= TOL
    z = torch.randn(2, 4, 5, 7)
    assert max_diff(qv.decode(sd, z, tile=24, mode="fast"), untiled_decode(sd, z)) <= TOL


def test_force_upcast_runs_a_half_model_in_float32_and_restores_it():
    half = torch.nn.Module.half(sd_tiny(seed=9, force_upcast=True))
    full = torch.nn.Module.float(torch.nn.Module.half(sd_tiny(seed=9)))  # the same fp16-rounded weights in float32
    z = torch.randn(1, 4, 5, 7)
    before = model_state(half)
    out = qv.decode(half, z.half(), tile=16)
    assert out.dtype == torch.float32
    assert max_diff(out, untiled_decode(full, z.half().float())) <= TOL
    assert next(half.parameters()).dtype == torch.float16
    assert {k: v[0] for k, v in model_state(half).items()} == {k: v[0] for k, v in before.items()}


def test_overflow_in_half_precision_is_an_error_not_a_silent_nan():
    vae = sd_tiny(seed=2, force_upcast=False)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)
        vae.decoder.conv_in.bias.fill_(6e4)
    vae = torch.nn.Module.half(vae)
    with pytest.raises(qv.NonFiniteOutputError, match="float32 or bfloat16"):
        qv.decode(vae, torch.randn(1, 4, 5, 7).half(), tile=16)


def test_model_is_left_as_it_was_after_an_error(sd):
    before = model_state(sd)

    def stop(done, total):
        if done == 5:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        qv.decode(sd, torch.randn(1, 4, 5, 7), tile=16, progress=stop)
    assert model_state(sd) == before
