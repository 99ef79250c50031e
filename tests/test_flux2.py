"""Flux.2's VAE (``AutoencoderKLFlux2``) through the SD-family path: exact and fast modes, against the untiled model.

Its batch norm and 2x2 latent patchify are applied by the pipeline outside ``encode``/``decode``, so
tiling covers exactly what ``vae.encode(x).latent_dist.mode()`` and ``vae.decode(z).sample`` compute.
The equality tests over tile layouts run in test_sd.py, whose ``model`` fixture includes two
Flux.2 configs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import flux2_tiny, max_diff, model_state, random_layouts, seeded, untiled_decode, untiled_encode, video
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quadtree_vae as qv
from quadtree_vae import adapters

TOL = 1e-4
TILES = [16, (24, 40), (16, 64), 200]


def image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return video(b, 1, h, w, seed)[:, :, 0]


@pytest.fixture(scope="module", params=["quant-convs", "no-quant-convs"])
def flux2(request):
    if request.param == "quant-convs":
        return flux2_tiny()
    return flux2_tiny(seed=1, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), op=st.sampled_from(["encode", "decode"]))
def test_random_layouts(data, op, flux2):
    x = image(1, 32, 48) if op == "encode" else torch.randn(1, 8, 4, 6)
    plan = qv.plan(flux2, x.shape, op=op)
    plan = random_layouts(data, plan)
    if op == "encode":
        assert max_diff(qv.encode(flux2, x, plan=plan), untiled_encode(flux2, x)) <= TOL
    else:
        assert max_diff(qv.decode(flux2, x, plan=plan), untiled_decode(flux2, x)) <= TOL


def test_fast_mode(flux2):
    """Exact when the frame is small enough for the statistics pass to see all of it; close otherwise."""
    x = image(1, 40, 56)
    assert max_diff(qv.encode(flux2, x, tile=24, mode="fast"), untiled_encode(flux2, x)) <= TOL
    z = torch.randn(1, 8, 5, 7)
    assert max_diff(qv.decode(flux2, z, tile=24, mode="fast"), untiled_decode(flux2, z)) <= TOL
    big = image(1, 512, 512)
    exact = qv.encode(flux2, big, tile=128)
    before = model_state(flux2)
    fast = qv.encode(flux2, big, tile=128, mode="fast")
    assert model_state(flux2) == before
    assert 0 < max_diff(fast, exact) < 0.5 * exact.abs().max().item()


def test_facts(flux2):
    facts = adapters.facts(flux2)
    assert (facts.spatial_factor, facts.temporal_factor, facts.in_channels, facts.latent_channels) == (8, None, 3, 8)


def test_full_flux2_config_at_small_size():
    from diffusers import AutoencoderKLFlux2

    vae = seeded(AutoencoderKLFlux2, 3)  # the released widths: 128..512, latent 32, quant convs
    x = image(1, 32, 48)
    z = untiled_encode(vae, x)
    assert max_diff(qv.encode(vae, x, tile=16), z) <= TOL
    assert max_diff(qv.decode(vae, z, tile=(16, 24)), untiled_decode(vae, z)) <= TOL
