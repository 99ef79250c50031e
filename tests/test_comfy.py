"""Tests for the ComfyUI nodes (quadtree_vae/comfy.py) and the repository-root custom-node package.

ComfyUI is not installed here: the tests use a stand-in with the interface of ``comfy.sd.VAE``
(``get_sd()``, ``first_stage_model``, ``device``, ``vae_dtype``, ``output_device``, ``latent_dim``,
``process_input`` / ``process_output``, ``encode`` / ``decode``) holding the reference fixtures'
release-layout weights, and fake ``comfy.utils`` / ``comfy.model_management`` modules.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import types
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from quadtree_vae import InvalidInputError, UnsupportedArchitectureError
from quadtree_vae import comfy as qc
from quadtree_vae.loading import vae_from_state_dict

ROOT = Path(__file__).resolve().parents[1]


# the engine's own tolerance plus the fixtures' diffusers-vs-original difference (fixtures README)
TOL = 1e-4 + 6e-6
TILE = 32


class StandInVAE:
    """What ComfyUI's ``comfy.sd.VAE`` offers a node, with the stock (untiled) encode/decode done
    the way ComfyUI does them, by the diffusers model built from the same release-layout weights."""

    def __init__(self, state_dict: dict[str, torch.Tensor], latent_dim: int):
        self._sd = state_dict
        self.first_stage_model = vae_from_state_dict(state_dict)
        self.device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.output_device = torch.device("cpu")
        self.latent_dim = latent_dim
        self.latent_channels = int(state_dict["decoder.conv_in.weight" if latent_dim == 2 else "conv2.weight"].shape[1])
        self.downscale_ratio = 8
        self.upscale_ratio = 8
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)
        self.memory_used_decode = lambda shape, dtype: 1000 * shape[-1] * shape[-2]
        self.get_sd_calls = 0
        self.stock_calls: list[str] = []

    def get_sd(self):
        self.get_sd_calls += 1
        return dict(self._sd)

    def encode(self, pixel_samples):  # ComfyUI's VAE.encode, untiled
        self.stock_calls.append("encode")
        h, w = pixel_samples.shape[1:3]
        pixel_samples = pixel_samples[:, (h % 8) // 2:(h % 8) // 2 + h // 8 * 8, (w % 8) // 2:(w % 8) // 2 + w // 8 * 8]
        x = self.process_input(pixel_samples.movedim(-1, 1))
        if self.latent_dim == 3:
            x = x.movedim(1, 0).unsqueeze(0)
        with torch.no_grad():
            return self.first_stage_model.encode(x).latent_dist.mode().float()

    def decode(self, samples_in):  # ComfyUI's VAE.decode, untiled
        self.stock_calls.append("decode")
        with torch.no_grad():
            out = self.first_stage_model.decode(samples_in).sample
        return self.process_output(out.float()).movedim(1, -1)


class UnknownVAE(StandInVAE):
    """A VAE quadtree-vae does not know (TAESD keys); its stock path just returns fixed tensors."""

    def __init__(self):
        self._sd = {"taesd_decoder.1.weight": torch.zeros(64, 4, 3, 3),
                    "taesd_encoder.0.weight": torch.zeros(64, 3, 3, 3)}
        self.first_stage_model = torch.nn.Identity()
        self.device = self.output_device = torch.device("cpu")
        self.vae_dtype = torch.float32
        self.get_sd_calls = 0
        self.stock_calls = []

    def encode(self, pixel_samples):
        self.stock_calls.append("encode")
        return torch.full((pixel_samples.shape[0], 4, pixel_samples.shape[1] // 8, pixel_samples.shape[2] // 8), 0.5)

    def decode(self, samples_in):
        self.stock_calls.append("decode")
        return torch.full((samples_in.shape[0], samples_in.shape[2] * 8, samples_in.shape[3] * 8, 3), 0.25)


def load(name: str):
    folder = FIXTURES / name
    return load_file(folder / "model.safetensors"), load_file(folder / "cases.safetensors")


@pytest.fixture(scope="module")
def sd_fixture():
    return load("sd-ldm-tiny")


@pytest.fixture(scope="module")
def wan_fixture():
    return load("wan21-original-tiny")


@pytest.fixture(scope="module")
def sd_vae(sd_fixture):
    return StandInVAE(sd_fixture[0], latent_dim=2)


@pytest.fixture(scope="module")
def wan_vae(wan_fixture):
    return StandInVAE(wan_fixture[0], latent_dim=3)


def to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) in [0, 1]."""
    return ((x + 1) / 2).movedim(1, -1).contiguous()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def fake_comfy(monkeypatch):
    """Fake ``comfy``, ``comfy.utils`` (ProgressBar) and ``comfy.model_management`` modules."""
    record = types.SimpleNamespace(bars=[], interrupt_checks=0, interrupt_at=None, freed=[])

    class ProgressBar:
        def __init__(self, total):
            self.total, self.current, self.updates = total, 0, []
            record.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            self.updates.append((value, self.total))

        def update(self, value):
            self.update_absolute(self.current + value)

    class Interrupted(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        record.interrupt_checks += 1
        if record.interrupt_at is not None and record.interrupt_checks >= record.interrupt_at:
            raise Interrupted("Processing interrupted")

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.free_memory = lambda memory_required, device, keep_loaded=(): record.freed.append((memory_required, device))
    mm.InterruptProcessingException = Interrupted
    comfy.utils, comfy.model_management = utils, mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return record


# ---------------------------------------------------------------------------------- SD family


def test_sd_encode_node(sd_vae, sd_fixture):
    _, cases = sd_fixture
    pixels = to_image(cases["image_64x96"])
    (latent,) = qc.QuadtreeVAEEncode().encode(pixels, sd_vae, tile_size=TILE, memory_budget_gb=0.0, mode="exact",
                                              fallback="error")
    z = latent["samples"]
    assert set(latent) == {"samples"} and z.shape == (1, 4, 8, 12) and z.dtype == torch.float32
    assert diff(z, cases["mean_64x96"]) < TOL
    assert diff(z, sd_vae.encode(pixels)) < 1e-4  # ComfyUI's stock path on the same weights


def test_sd_encode_crops_and_drops_alpha_like_comfyui(sd_vae, sd_fixture):
    _, cases = sd_fixture
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 69, 101, 4, generator=g)  # RGBA, sizes not multiples of 8
    z = qc.encode_image(sd_vae, pixels, tile_size=TILE)
    assert z.shape == (2, 4, 8, 12)
    assert diff(z, sd_vae.encode(pixels[..., :3])) < 1e-4


def test_sd_decode_node(sd_vae, sd_fixture):
    _, cases = sd_fixture
    (images,) = qc.QuadtreeVAEDecode().decode({"samples": cases["z_64x96"]}, sd_vae, tile_size=TILE,
                                              memory_budget_gb=0.0, mode="exact", fallback="error")
    assert images.shape == (1, 64, 96, 3) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert diff(images, to_image(cases["decoded_64x96"].clamp(-1, 1))) < TOL / 2
    assert diff(images, sd_vae.decode(cases["z_64x96"])) < 1e-4


def test_flux_layout_decode_and_encode():
    state, cases = load("flux-ldm-tiny")
    vae = StandInVAE(state, latent_dim=2)
    z = qc.encode_image(vae, to_image(cases["image_72x88"]), tile_size=TILE, budget_gb=0.5)
    assert z.shape == (1, 16, 9, 11)
    assert diff(z, cases["mean_72x88"]) < TOL
    images = qc.decode_latent(vae, cases["z_72x88"], tile_size=TILE)
    assert diff(images, to_image(cases["decoded_72x88"].clamp(-1, 1))) < TOL / 2


# ------------------------------------------------------------------------------ Wan / Qwen-Image


def test_wan_encode_takes_the_image_batch_as_frames(wan_vae, wan_fixture, caplog):
    _, cases = wan_fixture
    clip = cases["video_9x64x80"]  # (1, 3, 9, 64, 80)
    pixels = to_image(clip[0].movedim(1, 0))  # 9 IMAGEs of 64x80
    (latent,) = qc.QuadtreeVAEEncode().encode(pixels, wan_vae, TILE, 0.0, "exact", "error")
    z = latent["samples"]
    assert z.shape == (1, 4, 3, 8, 10)
    assert diff(z, cases["mu_9x64x80"]) < TOL
    assert diff(z, wan_vae.encode(pixels)) < 1e-4
    # 10 frames is not 1 + 4k: the last one is dropped, as ComfyUI's Wan VAE drops it
    extra = torch.cat([pixels, pixels[-1:]])
    with caplog.at_level(logging.WARNING, logger="quadtree_vae.comfy"):
        z10 = qc.encode_image(wan_vae, extra, tile_size=TILE)
    assert "not 1 + 4k" in caplog.text
    assert diff(z10, z) < 1e-5


def test_wan_decode_returns_frames_as_the_batch(wan_vae, wan_fixture):
    _, cases = wan_fixture
    z = cases["z_9x64x80"]
    (images,) = qc.QuadtreeVAEDecode().decode({"samples": z}, wan_vae, TILE, 0.0, "exact", "error")
    assert images.shape == (9, 64, 80, 3)
    want = to_image(cases["decoded_9x64x80"].clamp(-1, 1)[0].movedim(1, 0))
    assert diff(images, want) < TOL / 2
    stock = wan_vae.decode(z)  # (1, 9, 64, 80, 3); ComfyUI's VAEDecode then merges batch and frames
    assert diff(images, stock.reshape(-1, *stock.shape[-3:])) < 1e-4
    # two clips: clip-major order, B * T' images
    two = qc.decode_latent(wan_vae, torch.cat([cases["z_1x64x80"], cases["z_1x64x80"] * 0.5]), tile_size=TILE)
    assert two.shape == (2, 64, 80, 3)
    single = qc.decode_latent(wan_vae, cases["z_1x64x80"], tile_size=TILE)
    assert diff(two[:1], single) < 1e-5


# ------------------------------------------------------------------------------ Wan 2.2 / Flux.2


@pytest.fixture(scope="module")
def wan22_fixture():
    return load("wan22-original-tiny")


def test_wan22_nodes_match_the_fixture_and_the_untiled_model(wan22_fixture):
    """ComfyUI's Wan 2.2 VAE (get_sd() = the release keys): 16x crop, the IMAGE batch is the clip."""
    state, cases = wan22_fixture
    vae = StandInVAE(state, latent_dim=3)
    model = vae_from_state_dict(state)
    clip = cases["video_9x128x160"]
    pixels = to_image(clip[0].movedim(1, 0))  # 9 IMAGEs of 128x160
    (latent,) = qc.QuadtreeVAEEncode().encode(pixels, vae, 48, 0.0, "exact", "error")
    z = latent["samples"]
    assert z.shape == (1, 8, 3, 8, 10)
    assert diff(z, cases["mu_9x128x160"]) < TOL
    with torch.no_grad():
        assert diff(z, model.encode(clip).latent_dist.mode()) < 1e-4
    # sizes not multiples of 16 are centre-cropped to them, as ComfyUI's VAE Encode does for Wan 2.2
    one = to_image(cases["video_1x128x160"][:, :, 0])
    padded = torch.nn.functional.pad(one.movedim(-1, 1), (5, 6, 1, 2), value=0.3).movedim(1, -1)  # 131x171
    assert diff(qc.encode_image(vae, padded, tile_size=48), cases["mu_1x128x160"]) < TOL
    (images,) = qc.QuadtreeVAEDecode().decode({"samples": cases["z_9x128x160"]}, vae, 48, 0.0, "exact", "error")
    assert images.shape == (9, 128, 160, 3)
    assert diff(images, to_image(cases["decoded_9x128x160"].clamp(-1, 1)[0].movedim(1, 0))) < TOL / 2
    with torch.no_grad():
        stock = model.decode(cases["z_9x128x160"]).sample
    assert diff(images, to_image(stock[0].movedim(1, 0))) < 1e-4


def flux2_comfy_state() -> dict[str, torch.Tensor]:
    """What ComfyUI's Flux.2 VAE returns from get_sd(): ldm keys with the quant convs at the top level
    (ComfyUI moves them out of encoder/decoder) plus the latent batch norm ``bn.*``."""
    state = load_file(FIXTURES / "sd-ldm-tiny" / "model.safetensors")
    folded = 4 * state["post_quant_conv.weight"].shape[0]
    state["bn.running_mean"] = torch.linspace(-0.5, 0.7, folded)
    state["bn.running_var"] = torch.linspace(0.3, 2.5, folded)
    state["bn.num_batches_tracked"] = torch.tensor(11)
    return state


def flux2_pack(model, z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Flux.2 latent: diffusers' Flux2Pipeline fold, then the bn normalisation."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    folded = Flux2Pipeline._patchify_latents(z)
    return torch.nn.functional.batch_norm(folded, model.bn.running_mean, model.bn.running_var,
                                          eps=model.config.batch_norm_eps)


def flux2_unpack(model, packed: torch.Tensor) -> torch.Tensor:
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    return Flux2Pipeline._unpatchify_latents(packed * std + model.bn.running_mean.view(1, -1, 1, 1))


def test_flux2_nodes_take_and_give_comfyuis_packed_latent():
    state = flux2_comfy_state()
    vae = StandInVAE(state, latent_dim=2)
    model = vae_from_state_dict(state)
    assert type(model).__name__ == "AutoencoderKLFlux2"
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 71, 103, 4, generator=g)  # RGBA, not multiples of 16: cropped to 64x96 at (3, 3)
    (latent,) = qc.QuadtreeVAEEncode().encode(pixels, vae, TILE, 0.0, "exact", "error")
    z = latent["samples"]
    assert z.shape == (2, 16, 4, 6)  # 4 latent channels x 2x2 patch, 1/16 of the cropped image
    x = pixels[:, 3:67, 3:99, :3].movedim(-1, 1) * 2 - 1
    with torch.no_grad():
        want = flux2_pack(model, model.encode(x).latent_dist.mode())
    assert diff(z, want) < 1e-4
    packed = torch.randn(1, 16, 4, 6, generator=g)
    (images,) = qc.QuadtreeVAEDecode().decode({"samples": packed}, vae, TILE, 0.0, "exact", "error")
    assert images.shape == (1, 64, 96, 3)
    with torch.no_grad():
        stock = model.decode(flux2_unpack(model, packed)).sample
    assert diff(images, to_image(stock.clamp(-1, 1))) < 1e-4
    assert diff(qc.decode_latent(vae, z[:1], tile_size=TILE, mode="fast"), qc.decode_latent(vae, z[:1])) < 1e-4
    with pytest.raises(InvalidInputError, match="packed latent"):
        qc.decode_latent(vae, torch.zeros(1, 4, 8, 12))  # the raw 4-channel latent is not what ComfyUI hands over


# ------------------------------------------------------------------------------------ behaviour


def test_converted_model_is_cached_weakly_per_vae(sd_fixture):
    state, cases = sd_fixture
    vae = StandInVAE(state, latent_dim=2)
    first = qc.converted_model(vae)
    qc.decode_latent(vae, cases["z_64x96"], tile_size=TILE)
    qc.encode_image(vae, to_image(cases["image_64x96"]), tile_size=TILE)
    assert qc.converted_model(vae) is first and vae.get_sd_calls == 1
    assert first is not vae.first_stage_model
    other = StandInVAE(state, latent_dim=2)
    assert qc.converted_model(other) is not first and other.get_sd_calls == 1
    alive = weakref.ref(first)
    del vae, first
    gc.collect()
    assert alive() is None, "the converted model must go when ComfyUI drops the VAE"


def test_progress_and_cancel_go_through_comfyui(sd_vae, sd_fixture, fake_comfy):
    _, cases = sd_fixture
    qc.decode_latent(sd_vae, cases["z_64x96"], tile_size=TILE)
    (bar,) = fake_comfy.bars
    assert bar.total > 1 and bar.updates[-1] == (bar.total, bar.total)
    assert [v for v, _ in bar.updates] == sorted(v for v, _ in bar.updates)
    assert fake_comfy.interrupt_checks == len(bar.updates)
    assert fake_comfy.freed == []  # nothing to free on the CPU
    model = qc.converted_model(sd_vae)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    qc._make_room(sd_vae, model, torch.device("cuda", 0), 12345)  # on a GPU: ask ComfyUI for room first
    assert fake_comfy.freed == [(weights + 12345, torch.device("cuda", 0))]
    # "cancel" in ComfyUI stops the run between tiles; the node stays usable afterwards
    fake_comfy.interrupt_at = fake_comfy.interrupt_checks + 3
    with pytest.raises(Exception, match="interrupted"):
        qc.encode_image(sd_vae, to_image(cases["image_64x96"]), tile_size=TILE)
    fake_comfy.interrupt_at = None
    z = qc.encode_image(sd_vae, to_image(cases["image_64x96"]), tile_size=TILE)
    assert diff(z, cases["mean_64x96"]) < TOL


def test_without_comfyui_there_is_no_progress_bar(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy", None)  # "import comfy" fails, as outside ComfyUI
    monkeypatch.setitem(sys.modules, "comfy.utils", None)
    monkeypatch.setitem(sys.modules, "comfy.model_management", None)
    assert qc._progress() is None


def test_unknown_vae_gives_a_clear_error(fake_comfy):
    vae = UnknownVAE()
    pixels = torch.rand(1, 32, 48, 3)
    for run in (lambda: qc.encode_image(vae, pixels), lambda: qc.decode_latent(vae, torch.zeros(1, 4, 4, 6))):
        with pytest.raises(UnsupportedArchitectureError) as info:
            run()
        message = str(info.value)
        assert "cannot tile this VAE" in message and "Supported" in message and "'full'" in message
    assert vae.stock_calls == []
    with pytest.raises(UnsupportedArchitectureError, match="not a ComfyUI VAE"):
        qc.decode_latent(object(), torch.zeros(1, 4, 4, 6))
    odd = StandInVAE.__new__(StandInVAE)  # ldm keys, but a layout the converter chokes on
    odd.__dict__.update(vars(UnknownVAE()))
    odd._sd = {"decoder.mid.block_1.conv1.weight": torch.zeros(8, 8, 3, 3), "encoder.conv_in.weight": torch.zeros(1)}
    with pytest.raises(UnsupportedArchitectureError, match="cannot tile this VAE"):
        qc.decode_latent(odd, torch.zeros(1, 4, 4, 6))
    broken = UnknownVAE()
    broken.first_stage_model = None
    with pytest.raises(InvalidInputError, match="invalid"):
        qc.decode_latent(broken, torch.zeros(1, 4, 4, 6))


@pytest.mark.parametrize("full", ["full", "stock"])  # "stock": the widget's earlier name, from saved workflows
def test_unknown_vae_falls_back_to_the_stock_path(fake_comfy, caplog, full):
    vae = UnknownVAE()
    with caplog.at_level(logging.WARNING, logger="quadtree_vae.comfy"):
        (latent,) = qc.QuadtreeVAEEncode().encode(torch.rand(1, 32, 48, 4), vae, 0, 0.0, "exact", full)
    assert "cannot tile this VAE" in caplog.text and "fallback 'full'" in caplog.text
    assert latent["samples"].shape == (1, 4, 4, 6) and bool((latent["samples"] == 0.5).all())
    (images,) = qc.QuadtreeVAEDecode().decode({"samples": torch.zeros(2, 4, 4, 6)}, vae, 0, 0.0, "exact", full)
    assert images.shape == (2, 32, 48, 3) and bool((images == 0.25).all())
    assert vae.stock_calls == ["encode", "decode"]


def test_bad_options_and_inputs(sd_vae):
    with pytest.raises(InvalidInputError, match="fallback"):
        qc.decode_latent(sd_vae, torch.zeros(1, 4, 4, 4), fallback="untiled")
    with pytest.raises(InvalidInputError, match="budget"):
        qc.decode_latent(sd_vae, torch.zeros(1, 4, 4, 4), budget_gb=-1)
    with pytest.raises(InvalidInputError, match="IMAGE"):
        qc.encode_image(sd_vae, torch.zeros(3, 32, 32))
    with pytest.raises(InvalidInputError, match="channels"):
        qc.decode_latent(sd_vae, torch.zeros(1, 16, 4, 4))


def test_node_definitions_follow_comfyui_conventions():
    assert qc.NODE_DISPLAY_NAME_MAPPINGS == {
        "QuadtreeVAEEncode": "Quadtree VAE Encode",
        "QuadtreeVAEDecode": "Quadtree VAE Decode",
    }
    assert set(qc.NODE_CLASS_MAPPINGS) == set(qc.NODE_DISPLAY_NAME_MAPPINGS)
    enc, dec = qc.NODE_CLASS_MAPPINGS["QuadtreeVAEEncode"], qc.NODE_CLASS_MAPPINGS["QuadtreeVAEDecode"]
    assert enc.RETURN_TYPES == ("LATENT",) and dec.RETURN_TYPES == ("IMAGE",)
    for node, first in ((enc, ("pixels", "IMAGE")), (dec, ("samples", "LATENT"))):
        inputs = node.INPUT_TYPES()["required"]
        assert list(inputs) == [first[0], "vae", "tile_size", "memory_budget_gb", "mode", "fallback"]
        assert inputs[first[0]] == (first[1],) and inputs["vae"] == ("VAE",)
        assert inputs["tile_size"][0] == "INT" and inputs["memory_budget_gb"][0] == "FLOAT"
        assert inputs["mode"][0] == ["exact", "fast"] and inputs["fallback"][0] == ["error", "full"]
        assert callable(getattr(node(), node.FUNCTION)) and isinstance(node.CATEGORY, str)
        json.dumps(inputs)  # ComfyUI serves these to the browser


# -------------------------------------------------------------------------- root custom-node package

_LOADER = r"""
import importlib.abc, importlib.util, json, os, sys
root = sys.argv[1]

def load_like_comfyui(name):
    # ComfyUI's nodes.load_custom_node: spec_from_file_location(<name>, <dir>/__init__.py), exec_module
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "quadtree_vae" or fullname.startswith("quadtree_vae."):
            raise ModuleNotFoundError(f"No module named {fullname!r}")
        return None

out = {}
sys.meta_path.insert(0, NotInstalled())
clone = load_like_comfyui(root.replace(".", "_x_"))  # a clone in custom_nodes/, not pip-installed
out["clone"] = sorted(clone.NODE_CLASS_MAPPINGS)
out["clone_module"] = clone.NODE_CLASS_MAPPINGS["QuadtreeVAEDecode"].__module__
sys.meta_path.pop(0)
installed = load_like_comfyui("custom_nodes.quadtree-vae")  # pip install -e . done
out["installed"] = sorted(installed.NODE_DISPLAY_NAME_MAPPINGS.values())
out["installed_module"] = installed.NODE_CLASS_MAPPINGS["QuadtreeVAEEncode"].__module__
out["comfy_imported"] = "comfy" in sys.modules
print(json.dumps(out))
"""


def test_repository_root_is_a_comfyui_custom_node_package():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(ROOT)], capture_output=True, text=True, env=env,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["clone"] == ["QuadtreeVAEDecode", "QuadtreeVAEEncode"]
    assert out["clone_module"] == str(ROOT).replace(".", "_x_") + ".quadtree_vae.comfy"  # relative import
    assert out["installed"] == ["Quadtree VAE Decode", "Quadtree VAE Encode"]
    assert out["installed_module"] == "quadtree_vae.comfy"  # the installed package, not a second copy
    assert not out["comfy_imported"]


def test_a_real_error_is_not_turned_into_cannot_tile(fake_comfy):
    """Only an unknown layout takes the fallback; a bug (here: get_sd failing) is raised as it is."""
    vae = UnknownVAE()

    def broken():
        raise RuntimeError("simulated bug while reading the weights")

    vae.get_sd = broken
    for fallback in ("error", "full"):
        with pytest.raises(RuntimeError, match="simulated bug"):
            qc.decode_latent(vae, torch.zeros(1, 4, 4, 6), fallback=fallback)
    assert vae.stock_calls == []
