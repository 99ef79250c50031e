"""Loading the Wan 2.2 and Flux.2 release layouts (quadtree_vae.keymaps), and the random:wan2.2 /
random:qwen-image-2.1 / random:flux2 defaults."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, max_diff
from safetensors.torch import load_file, save_file

import quadtree_vae as qv
from quadtree_vae import adapters, keymaps
from quadtree_vae.errors import LoadError
from quadtree_vae.loading import describe, detect_layout, load_vae, parse_vae_spec, vae_from_state_dict

TOL = 1e-4
WAN22 = FIXTURES / "wan22-original-tiny"
SD = FIXTURES / "sd-ldm-tiny"
ORIGINAL = 2.5e-6  # measured: diffusers' Wan 2.2 blocks vs the original implementation, untiled


@pytest.fixture(scope="module")
def wan22_file_vae():
    return load_vae(WAN22 / "model.safetensors")


def test_wan22_config_is_read_off_the_weights(wan22_file_vae):
    cfg = wan22_file_vae.config
    assert type(wan22_file_vae).__name__ == "AutoencoderKLWan"
    assert (cfg.base_dim, cfg.decoder_base_dim, cfg.z_dim, cfg.patch_size) == (8, 16, 8, 2)
    assert (list(cfg.dim_mult), cfg.num_res_blocks) == ([1, 2, 4, 4], 2)
    assert list(cfg.temperal_downsample) == [False, True, True]
    assert cfg.is_residual and (cfg.in_channels, cfg.out_channels) == (12, 12)
    assert describe(wan22_file_vae)["arch"] == "wan2.2"
    facts = adapters.facts(wan22_file_vae)
    assert (facts.spatial_factor, facts.temporal_factor, facts.in_channels) == (16, 4, 3)


@pytest.mark.parametrize("name", ["1x128x160", "9x128x160"])
def test_wan22_original_fixture_through_the_loader(wan22_file_vae, name):
    """Weights in the original Wan 2.2 layout; outputs computed by the original implementation."""
    cases = load_file(WAN22 / "cases.safetensors")
    assert max_diff(qv.encode(wan22_file_vae, cases[f"video_{name}"], tile=64), cases[f"mu_{name}"]) <= TOL + ORIGINAL
    y = qv.decode(wan22_file_vae, cases[f"z_{name}"], tile=(64, 96))
    assert max_diff(y, cases[f"decoded_{name}"].clamp(-1, 1)) <= TOL + ORIGINAL


def test_wan22_under_a_prefix_and_from_a_state_dict(wan22_file_vae):
    sd = load_file(WAN22 / "model.safetensors")
    vae = vae_from_state_dict({f"first_stage_model.{k}": v for k, v in sd.items()})
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), wan22_file_vae.state_dict().values()))


def test_wan22_is_told_by_nested_keys_patchified_input_or_wide_latent():
    wan21 = load_file(FIXTURES / "wan21-original-tiny" / "model.safetensors")
    assert not keymaps.is_wan22(wan21)
    assert keymaps.is_wan22(load_file(WAN22 / "model.safetensors"))
    assert keymaps.is_wan22(dict(wan21, **{"encoder.conv1.weight": torch.zeros(8, 12, 3, 3, 3)}))
    assert keymaps.is_wan22(dict(wan21, **{"encoder.head.2.weight": torch.zeros(96, 8, 3, 3, 3)}))


def test_wan22_unknown_or_missing_keys_are_refused():
    sd = load_file(WAN22 / "model.safetensors")
    extra = dict(sd, **{"encoder.downsamples.1.downsamples.0.residual.9.weight": torch.zeros(1)})
    with pytest.raises(LoadError, match="residual.9"):
        vae_from_state_dict(extra)
    missing = {k: v for k, v in sd.items() if k != "decoder.upsamples.0.upsamples.3.time_conv.bias"}
    with pytest.raises(LoadError, match="time_conv"):
        vae_from_state_dict(missing)


def _flux2_layout(sd: dict) -> dict:
    """An ldm-layout state dict rewritten as Flux.2's ae.safetensors: quant convs inside encoder/decoder, bn."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("quant_conv.", "post_quant_conv.")):
            k = ("encoder." if k.startswith("quant") else "decoder.") + k
        out[k] = v
    z = sd["post_quant_conv.weight"].shape[0]
    out["bn.running_mean"] = torch.linspace(-1, 1, 4 * z)
    out["bn.running_var"] = torch.linspace(0.5, 2, 4 * z)
    out["bn.num_batches_tracked"] = torch.tensor(7)
    return out


def test_flux2_ae_layout_loads_and_matches_the_reference(tmp_path):
    """The sgm reference VAE saved in Flux.2's layout: same encoder/decoder, plus the latent batch norm."""
    path = tmp_path / "ae.safetensors"
    flux2 = _flux2_layout(load_file(SD / "model.safetensors"))
    save_file(flux2, str(path))
    assert detect_layout(flux2) == "flux2"
    vae = load_vae(path)
    assert type(vae).__name__ == "AutoencoderKLFlux2" and describe(vae)["arch"] == "flux2"
    assert list(vae.config.patch_size) == [2, 2]
    assert torch.equal(vae.bn.running_var, flux2["bn.running_var"])
    cases = load_file(SD / "cases.safetensors")
    assert max_diff(qv.encode(vae, cases["image_64x96"], tile=32), cases["mean_64x96"]) <= TOL + 5.3e-6
    assert max_diff(qv.decode(vae, cases["z_64x96"], tile=(32, 24)), cases["decoded_64x96"]) <= TOL + 5.3e-6


def test_flux2_batch_norm_width_gives_the_patch():
    assert keymaps.flux2_config({"bn.running_mean": torch.zeros(4 * 9)}, 4) == {"patch_size": [3, 3]}
    with pytest.raises(LoadError, match="patch"):
        keymaps.flux2_config({"bn.running_mean": torch.zeros(10)}, 4)


@pytest.mark.parametrize("spec,cls,facts", [
    ("random:wan2.2:tiny", "AutoencoderKLWan", (16, 4, 3, 48)),
    ("random:qwen-image-2.1:tiny", "AutoencoderKLQwenImage21", (16, 8, 4, 64)),
    ("random:flux2:tiny", "AutoencoderKLFlux2", (8, None, 3, 32)),
])
def test_random_defaults(spec, cls, facts):
    vae = parse_vae_spec(spec)
    assert type(vae).__name__ == cls
    f = adapters.facts(vae)
    assert (f.spatial_factor, f.temporal_factor, f.in_channels, f.latent_channels) == facts
    info = describe(vae)
    assert info["random"] and info["spatial_factor"] == facts[0] and info["latent_channels"] == facts[3]
    side = 4 * facts[0]
    x = torch.rand(1, facts[2], 1, side, side) * 2 - 1 if f.temporal else torch.rand(1, 3, side, side) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mode()
    assert max_diff(qv.encode(vae, x, tile=3 * facts[0]), ref) <= TOL
