"""Tests for quadtree_vae.loading: offline loading of real checkpoint layouts, refusals, random VAEs.

The reference fixtures (small seeded VAEs saved in release layouts, with outputs computed by the
original implementations) live in tests/fixtures (see its README.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file, save_file

from quadtree_vae.checkpoints import headline
from quadtree_vae.errors import InvalidInputError, LoadError
from quadtree_vae.loading import (
    ARCH_ATTR,
    ARCHES,
    RANDOM_ATTR,
    describe,
    detect_layout,
    fingerprint,
    load_vae,
    parse_vae_spec,
    random_vae,
    vae_from_state_dict,
)

WAN = FIXTURES / "wan21-original-tiny"
SD = FIXTURES / "sd-ldm-tiny"
FLUX = FIXTURES / "flux-ldm-tiny"

TOL = 1e-4


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# fixtures: each reference model is loaded once per module
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_vae():
    return load_vae(WAN / "model.safetensors")


@pytest.fixture(scope="module")
def sd_vae():
    return load_vae(SD / "model.safetensors")


@pytest.fixture(scope="module")
def flux_vae():
    return load_vae(FLUX / "model.safetensors")


@pytest.fixture(scope="module")
def wan_cases():
    return load_file(str(WAN / "cases.safetensors"))


def _check_wan(vae, cases, size):
    with torch.no_grad():
        mu = vae.encode(cases[f"video_{size}"]).latent_dist.mode()
        decoded = vae.decode(cases[f"z_{size}"]).sample
    assert _maxdiff(mu, cases[f"mu_{size}"]) < TOL
    # diffusers clamps the decoded video to [-1, 1]; the reference is stored before the clamp
    assert _maxdiff(decoded, cases[f"decoded_{size}"].clamp(-1, 1)) < TOL


def _check_ldm(vae, folder, size):
    cases = load_file(str(folder / "cases.safetensors"))
    with torch.no_grad():
        mean = vae.encode(cases[f"image_{size}"]).latent_dist.mode()
        decoded = vae.decode(cases[f"z_{size}"]).sample
    assert _maxdiff(mean, cases[f"mean_{size}"]) < TOL
    assert _maxdiff(decoded, cases[f"decoded_{size}"]) < TOL


# ------------------------------------------------------------------------------------------------
# the reference fixtures, loaded from their release layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "layout"), [(WAN, "wan2.1"), (SD, "ldm"), (FLUX, "ldm-noquant")], ids=["wan", "sd", "flux"]
)
def test_detect_layout_of_fixtures(folder, layout):
    assert detect_layout(load_file(str(folder / "model.safetensors"))) == layout


@pytest.mark.parametrize("size", ["1x64x80", "9x64x80"])
def test_wan_fixture_matches_original(wan_vae, wan_cases, size):
    assert type(wan_vae).__name__ == "AutoencoderKLWan"
    assert not wan_vae.training
    assert wan_vae.config.base_dim == 8 and wan_vae.config.z_dim == 4
    _check_wan(wan_vae, wan_cases, size)


def test_wan_file_as_qwen_image_matches_original(wan_cases):
    vae = load_vae(WAN / "model.safetensors", arch="qwen-image")
    assert type(vae).__name__ == "AutoencoderKLQwenImage"
    assert describe(vae)["arch"] == "qwen-image"
    _check_wan(vae, wan_cases, "9x64x80")


def test_sd_fixture_matches_original(sd_vae):
    assert type(sd_vae).__name__ == "AutoencoderKL"
    cfg = sd_vae.config
    assert list(cfg.block_out_channels) == [32, 64, 64, 64]
    assert cfg.layers_per_block == 2 and cfg.latent_channels == 4 and cfg.norm_num_groups == 32
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.mid_block_add_attention
    assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.shift_factor is None
    _check_ldm(sd_vae, SD, "64x96")


def test_flux_fixture_matches_original(flux_vae):
    assert type(flux_vae).__name__ == "AutoencoderKL"
    cfg = flux_vae.config
    assert cfg.latent_channels == 16 and not cfg.use_quant_conv and not cfg.use_post_quant_conv
    assert cfg.scaling_factor == pytest.approx(0.3611) and cfg.shift_factor == pytest.approx(0.1159)
    assert describe(flux_vae)["arch"] == "flux"
    _check_ldm(flux_vae, FLUX, "72x88")


def test_arch_keyword_picks_family_factors():
    sdxl = load_vae(SD / "model.safetensors", arch="sdxl")
    assert sdxl.config.scaling_factor == pytest.approx(0.13025) and sdxl.config.force_upcast
    sd3 = load_vae(FLUX / "model.safetensors", arch="sd3")
    assert sd3.config.scaling_factor == pytest.approx(1.5305) and sd3.config.shift_factor == pytest.approx(0.0609)
    assert describe(sd3)["arch"] == "sd3"
    with pytest.raises(InvalidInputError, match="ldm"):
        load_vae(SD / "model.safetensors", arch="flux")
    with pytest.raises(InvalidInputError, match="wan2.1"):
        load_vae(WAN / "model.safetensors", arch="sd")
    with pytest.raises(InvalidInputError, match="unknown arch"):
        load_vae(SD / "model.safetensors", arch="sd9")


def test_in_memory_state_dicts_like_comfyui(wan_vae, sd_vae):
    wan = vae_from_state_dict(load_file(str(WAN / "model.safetensors")))
    assert _same_weights(wan, wan_vae)
    qwen = vae_from_state_dict(load_file(str(WAN / "model.safetensors")), arch="qwen-image")
    assert type(qwen).__name__ == "AutoencoderKLQwenImage"
    src = load_file(str(SD / "model.safetensors"))
    sd = vae_from_state_dict(src)
    assert _same_weights(sd, sd_vae)
    # the loaded model owns its weights: changing it does not touch the caller's tensors
    before = src["decoder.conv_in.weight"].clone()
    with torch.no_grad():
        sd.decoder.conv_in.weight.add_(1.0)
    assert torch.equal(src["decoder.conv_in.weight"], before)


# ------------------------------------------------------------------------------------------------
# other containers and prefixes, written by the tests
# ------------------------------------------------------------------------------------------------


def test_wan_as_pth_with_weights_only(tmp_path, wan_vae):
    path = tmp_path / "wan_2.1_vae.pth"
    torch.save(load_file(str(WAN / "model.safetensors")), path)
    assert _same_weights(load_vae(path), wan_vae)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": load_file(str(WAN / "model.safetensors")), "step": 3}, wrapped)
    assert _same_weights(load_vae(wrapped), wan_vae)


def test_sd_inside_full_checkpoint_ckpt(tmp_path, sd_vae):
    sd = {f"first_stage_model.{k}": v for k, v in load_file(str(SD / "model.safetensors")).items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    sd["model.diffusion_model.out.2.bias"] = torch.randn(4)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())  # training leftovers are not VAE weights
    path = tmp_path / "sd-full.ckpt"
    torch.save({"state_dict": sd, "global_step": 1000, "epoch": 2}, path)
    assert detect_layout({"state_dict": sd}) == "ldm"
    vae = load_vae(path)
    assert _same_weights(vae, sd_vae)
    _check_ldm(vae, SD, "64x96")


def test_sd_with_vae_prefix_safetensors(tmp_path, sd_vae):
    path = tmp_path / "prefixed.safetensors"
    save_file({f"vae.{k}": v for k, v in load_file(str(SD / "model.safetensors")).items()}, str(path))
    assert _same_weights(load_vae(path), sd_vae)


@pytest.mark.parametrize("arch", ARCHES)
def test_diffusers_folder_roundtrip(tmp_path, arch):
    ref = random_vae(arch, seed=5, tiny=True)
    ref.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    assert type(vae) is type(ref) and _same_weights(vae, ref)
    assert not vae.training
    assert describe(vae)["arch"] == arch and describe(vae)["random"] is False
    assert fingerprint(vae) == fingerprint(ref)
    # a pipeline folder: the VAE sits in vae/
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    assert _same_weights(load_vae(tmp_path), ref)
    # the weights file alone is resolved through its folder's config.json
    assert _same_weights(load_vae(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"), ref)


def test_diffusers_folder_with_missing_weight_is_refused(tmp_path):
    random_vae("sd", tiny=True).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    del sd["decoder.conv_in.bias"]
    save_file(sd, str(weights))
    with pytest.raises(LoadError, match=r"decoder\.conv_in\.bias"):
        load_vae(tmp_path)


def test_diffusers_folder_with_wrong_shape_names_the_key_and_shapes(tmp_path):
    random_vae("sd", tiny=True).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["decoder.conv_in.bias"] = torch.zeros(7)
    save_file(sd, str(weights))
    # diffusers lists the details under a heading line: the message carries the first of them
    with pytest.raises(LoadError, match=r"size mismatch for decoder\.conv_in\.bias.*\[7\]") as err:
        load_vae(tmp_path)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_folder_arch_must_fit_class(tmp_path):
    random_vae("wan2.1", tiny=True).save_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match="AutoencoderKLWan"):
        load_vae(tmp_path, arch="sd")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32), (None, torch.float32)],
)
def test_dtype_and_device(dtype, expected):
    vae = load_vae(SD / "model.safetensors", device="cpu", dtype=dtype)
    assert {p.dtype for p in vae.parameters()} == {expected}
    assert {p.device.type for p in vae.parameters()} == {"cpu"}


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="dtype"):
        random_vae("sd", tiny=True, dtype="int8")
    with pytest.raises(InvalidInputError, match="dtype"):
        random_vae("sd", tiny=True, dtype=torch.int64)
    with pytest.raises(InvalidInputError, match="device"):
        random_vae("sd", tiny=True, device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            load_vae("/nonexistent.safetensors", device="cuda")
    with pytest.raises(InvalidInputError, match="arch"):
        random_vae("sd9")
    with pytest.raises(InvalidInputError, match="seed"):
        random_vae("sd", seed=-1)


# ------------------------------------------------------------------------------------------------
# refusals: every one is a LoadError that names the file
# ------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(LoadError, match="nope.safetensors.*no such file"):
        load_vae(path)


def test_random_bytes_safetensors(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(LoadError, match="noise.safetensors.*not a readable safetensors file") as err:
        load_vae(path)
    assert type(err.value.__cause__).__name__ == "SafetensorError"  # safetensors' own check, kept as cause


def test_truncated_safetensors(tmp_path):
    data = (WAN / "model.safetensors").read_bytes()
    body = tmp_path / "cut.safetensors"
    body.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="cut.safetensors.*not a readable safetensors file"):
        load_vae(body)
    head = tmp_path / "head.safetensors"
    head.write_bytes(data[:100])
    with pytest.raises(LoadError, match="head.safetensors.*not a readable safetensors file"):
        load_vae(head)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(LoadError, match="tiny.safetensors.*not a readable safetensors file"):
        load_vae(tiny)


def test_unrelated_keys(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({f"blocks.{i}.weight": torch.zeros(2, 2) for i in range(12)}, str(path))
    with pytest.raises(LoadError, match=r"unet.safetensors.*found 12 keys, none of the known VAE layouts"):
        load_vae(path)
    with pytest.raises(LoadError, match="none of the known VAE layouts"):
        detect_layout(load_file(str(path)))


def test_diffusers_keys_in_a_lone_file_get_a_hint(tmp_path):
    sd = random_vae("sd", tiny=True).state_dict()
    path = tmp_path / "exported.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(LoadError, match="diffusers' own layout"):
        load_vae(path)


class _Payload:
    """Unpickling this would create a file; weights_only loading must refuse before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"decoder.middle.0.residual.0.gamma": torch.ones(1), "x": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(LoadError, match=r"evil.pth.*refused.*\((builtins|io)\.open\)") as err:
        load_vae(path)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_corrupt_and_unknown_files(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(LoadError, match="garbage.ckpt.*not a readable PyTorch checkpoint"):
        load_vae(bad)
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.zeros(1000)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:1500])
    with pytest.raises(LoadError, match="cut.pth.*not a readable PyTorch checkpoint"):
        load_vae(cut)
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(LoadError, match="weights.onnx.*unsupported file type"):
        load_vae(other)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(LoadError, match="empty.pt.*no tensors"):
        load_vae(empty)


def test_error_headline_keeps_the_first_detail_under_a_heading():
    assert headline(RuntimeError("Error(s) in loading:\n\tsize mismatch for a.b\n\tmore advice")) == (
        "Error(s) in loading: size mismatch for a.b"
    )
    assert headline(RuntimeError("bad magic number\n\nlong advice paragraph")) == "bad magic number"
    assert headline(EOFError()) == ""


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="without config.json"):
        load_vae(tmp_path)


@pytest.mark.parametrize(
    ("folder", "drop", "reported"),
    [
        (WAN, "decoder.middle.1.proj.bias", "decoder.mid_block.attentions.0.proj.bias"),
        (SD, "decoder.up.1.block.0.conv1.weight", "decoder.up_blocks.2.resnets.0.conv1.weight"),
    ],
    ids=["wan", "sd"],
)
def test_missing_key_is_refused(tmp_path, folder, drop, reported):
    sd = load_file(str(folder / "model.safetensors"))
    del sd[drop]
    path = tmp_path / "incomplete.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoadError, match="incomplete.safetensors.*1 missing") as info:
        load_vae(path)
    assert reported in str(info.value)


@pytest.mark.parametrize(
    ("folder", "extra", "reported"),
    [
        (WAN, "decoder.middle.9.residual.0.gamma", "decoder.middle.9.residual.0.gamma"),
        (SD, "encoder.down.0.block.7.norm1.weight", "encoder.down_blocks.0.resnets.7.norm1.weight"),
    ],
    ids=["wan", "sd"],
)
def test_unexpected_key_is_refused(tmp_path, folder, extra, reported):
    sd = load_file(str(folder / "model.safetensors"))
    sd[extra] = torch.ones(4)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoadError, match="extra.safetensors.*1 unexpected") as info:
        load_vae(path)
    assert reported in str(info.value)


def test_wrong_shape_is_refused(tmp_path):
    sd = load_file(str(SD / "model.safetensors"))
    sd["decoder.mid.attn_1.q.bias"] = torch.zeros(7)
    path = tmp_path / "shape.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoadError, match=r"shape.safetensors.*other shapes.*to_q\.bias"):
        load_vae(path)


def test_wan22_is_recognised_and_incomplete_weights_are_refused():
    # the nested block keys and the 48-channel latent of the original Wan 2.2 release
    sd = {
        "encoder.conv1.weight": torch.zeros(8, 12, 3, 3, 3),
        "encoder.downsamples.0.downsamples.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
        "encoder.middle.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
        "encoder.head.2.weight": torch.zeros(96, 8, 3, 3, 3),
        "decoder.middle.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
        "decoder.upsamples.0.upsamples.0.residual.0.gamma": torch.ones(8, 1, 1, 1),
        "conv1.weight": torch.zeros(96, 96, 1, 1, 1),
        "conv2.weight": torch.zeros(48, 48, 1, 1, 1),
    }
    assert detect_layout(sd) == "wan2.2"
    with pytest.raises(LoadError, match="Wan 2.2"):
        vae_from_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# random (embedded default) models, specs, describe and fingerprint
# ------------------------------------------------------------------------------------------------

_CLASSES = {
    "wan2.1": "AutoencoderKLWan",
    "qwen-image": "AutoencoderKLQwenImage",
    "sd": "AutoencoderKL",
    "sdxl": "AutoencoderKL",
    "flux": "AutoencoderKL",
    "sd3": "AutoencoderKL",
}


@pytest.mark.parametrize("arch", sorted(_CLASSES))  # the 16x families: tests/test_keymaps.py
def test_random_tiny_round_trip(arch):
    vae = random_vae(arch, seed=1, tiny=True)
    assert type(vae).__name__ == _CLASSES[arch] and not vae.training
    info = describe(vae)
    assert info["random"] is True and info["arch"] == arch and info["spatial_factor"] == 8
    video = arch in ("wan2.1", "qwen-image")
    assert info["temporal_factor"] == (4 if video else None)
    assert info["latent_channels"] == (4 if arch in ("sd", "sdxl") else 16)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1 if video else torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
    lat = (1, info["latent_channels"], 2, 4, 4) if video else (1, info["latent_channels"], 4, 4)
    assert tuple(z.shape) == lat and y.shape == x.shape
    assert torch.isfinite(z).all() and torch.isfinite(y).all()
    # seeded default init gives outputs of sane magnitude (neither vanishing nor exploding)
    assert 1e-4 < y.std().item() < 10 and z.abs().max().item() < 1e3


@pytest.mark.parametrize("arch", ["wan2.1", "sd"])
def test_random_is_deterministic_and_leaves_global_rng_alone(arch):
    state = torch.get_rng_state()
    a = random_vae(arch, seed=7, tiny=True)
    b = random_vae(arch, seed=7, tiny=True)
    assert torch.equal(torch.get_rng_state(), state)
    c = random_vae(arch, seed=8, tiny=True)
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)
    assert fingerprint(a, full=True) == fingerprint(b, full=True) != fingerprint(c, full=True)
    assert describe(a) == describe(b)
    assert getattr(a, RANDOM_ATTR) == f"random:{arch}:tiny:seed=7"
    assert getattr(a, ARCH_ATTR) == arch


def test_random_model_family_factors():
    assert random_vae("sdxl", tiny=True).config.scaling_factor == pytest.approx(0.13025)
    assert random_vae("sdxl", tiny=True).config.force_upcast is True
    flux = random_vae("flux", tiny=True).config
    assert (flux.scaling_factor, flux.shift_factor, flux.use_quant_conv) == (0.3611, 0.1159, False)
    sd3 = random_vae("sd3", tiny=True).config
    assert (sd3.scaling_factor, sd3.shift_factor) == (1.5305, 0.0609)


def test_fingerprint_tracks_weights_and_dtype():
    vae = random_vae("sd", tiny=True)
    fp = fingerprint(vae)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(vae) == fp
    assert fingerprint(random_vae("sd", tiny=True, dtype="bf16")) != fp
    with torch.no_grad():
        vae.encoder.conv_in.weight.view(-1)[0] += 1.0  # the first element is always sampled
    assert fingerprint(vae) != fp


def test_describe_loaded(wan_vae, sd_vae):
    info = describe(wan_vae)
    assert info == {
        "class": "AutoencoderKLWan",
        "arch": "wan2.1",
        "params": sum(p.numel() for p in wan_vae.parameters()),
        "latent_channels": 4,
        "spatial_factor": 8,
        "temporal_factor": 4,
        "random": False,
    }
    assert describe(sd_vae)["arch"] == "sd" and describe(sd_vae)["temporal_factor"] is None
    assert fingerprint(sd_vae) == fingerprint(load_vae(SD / "model.safetensors"))


def test_parse_vae_spec(tmp_path):
    vae = parse_vae_spec("random:flux:tiny:seed=2")
    assert _same_weights(vae, random_vae("flux", seed=2, tiny=True))
    assert getattr(vae, RANDOM_ATTR) == "random:flux:tiny:seed=2"
    assert describe(parse_vae_spec("random:qwen:tiny"))["arch"] == "qwen-image"
    random_vae("sd", tiny=True).save_pretrained(tmp_path)
    loaded = parse_vae_spec(str(tmp_path), dtype="fp16")
    assert describe(loaded)["random"] is False and next(loaded.parameters()).dtype == torch.float16
    for bad in ["", "random", "random:", "random:sd9", "random:sd:huge", "random:sd:seed=x"]:
        with pytest.raises(InvalidInputError):
            parse_vae_spec(bad)


def test_load_vae_takes_the_command_lines_random_specs():
    vae = load_vae("random:sd:tiny:seed=3", dtype="fp16")
    assert _same_weights(vae, random_vae("sd", seed=3, tiny=True, dtype="fp16"))
    assert getattr(vae, RANDOM_ATTR) == "random:sd:tiny:seed=3"
    for bad in ["random", "random:", "random:sd9", "random:sd:huge"]:
        with pytest.raises(InvalidInputError):
            load_vae(bad)
    with pytest.raises(InvalidInputError, match="arch"):
        load_vae("random:sd:tiny", arch="flux")


def test_folder_load_prints_nothing_and_restores_diffusers_logging(tmp_path):
    # diffusers' handler holds whatever sys.stderr was at its first use, so watch its logger itself
    import logging

    from diffusers.utils import logging as diffusers_logging

    random_vae("sd", tiny=True).save_pretrained(tmp_path)
    records: list[logging.LogRecord] = []
    watcher = logging.Handler()
    watcher.emit = records.append
    root = logging.getLogger("diffusers")
    root.addHandler(watcher)
    before = diffusers_logging.get_verbosity()
    try:
        load_vae(tmp_path)
    finally:
        root.removeHandler(watcher)
    assert [r.getMessage() for r in records] == []  # e.g. its advice to install accelerate
    assert diffusers_logging.get_verbosity() == before


def test_shipped_full_configs_build_the_released_sizes():
    # built on the meta device: checks the shipped JSON without allocating 100M+ parameters
    from quadtree_vae import archs

    sizes = {"wan2.1": 126_892_531, "qwen-image": 126_892_531, "sd": 83_653_863, "flux": 83_819_683}
    for arch, n in sizes.items():
        config = archs.arch_config(arch)
        cls = archs.class_for(config["_class_name"], arch)
        with torch.device("meta"):
            model = cls(**archs.constructor_kwargs(config))
        assert sum(p.numel() for p in model.parameters()) == n, arch
