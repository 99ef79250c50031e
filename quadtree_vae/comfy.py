"""ComfyUI nodes: "Quadtree VAE Encode" and "Quadtree VAE Decode".

They take ComfyUI's own ``VAE`` object (``comfy.sd.VAE``), read its weights with ``vae.get_sd()``
(ComfyUI keeps VAE weights in the original release layouts: ldm/sgm keys for the SD family, plus
``bn.*`` for Flux.2; the Wan 2.1 release keys for Wan 2.1 and Qwen-Image; the Wan 2.2 release keys,
``encoder.downsamples.0.downsamples.0.residual.0.gamma`` ..., for Wan 2.2), build the matching
diffusers model once per VAE object with :func:`quadtree_vae.loading.vae_from_state_dict`, and run
the tiled engine on it. Results equal the untiled model's, so they are what ComfyUI's stock "VAE
Encode" / "VAE Decode" give, without the seams of ComfyUI's tiled nodes and within a memory budget.

ComfyUI conventions followed (``comfy/sd.py`` ``VAE.encode`` / ``VAE.decode``, ``nodes.py``
``VAEEncode`` / ``VAEDecode``):

* IMAGE is (B, H, W, C) float in [0, 1]; only the first 3 channels are encoded, and H and W are
  centre-cropped to a multiple of the VAE's spatial factor (its adapter's: 8, 16 for Wan 2.2, 16 for
  Flux.2 with its latent patch), as ``VAE.vae_encode_crop_pixels`` does.
  Pixels go through ``vae.process_input`` (x * 2 - 1) and decoded images through
  ``vae.process_output`` ((x + 1) / 2 clamped to [0, 1]).
* LATENT is ``{"samples": (B, C, h, w)}``, or (B, C, T, h, w) for the Wan / Qwen-Image VAE; the
  latents are the raw VAE latents (ComfyUI applies scale/shift inside the model, not in the VAE),
  except Flux.2's: ComfyUI's Flux.2 VAE (``bn.running_mean`` in its weights) folds the 32-channel
  latent's 2x2 patches into 128 channels and normalises them with ``bn``'s running statistics inside
  the VAE, so its LATENT is (B, 128, H/16, W/16); the nodes do the same around the tiled 32-channel
  model (the adapter's ``pack_latent`` / ``unpack_latent``, diffusers' ``Flux2Pipeline`` fold).
  Encoding returns the posterior mean, as ComfyUI's VAE Encode does for every family (checked
  against ComfyUI v0.8.0: equal to VAE Encode / VAE Decode within 1.8e-5).
* For a video VAE the IMAGE batch is the frames of one clip: B images encode to (1, C, T', h, w)
  with T' the latent frames the adapter states (1 + (B - 1) // 4 for Wan 2.1 and 2.2; frames the model
  does not take are dropped, as ComfyUI drops them, with a warning), and a decoded
  (B, C, T, h, w) latent comes back as B * T' images.
* Outputs are float32 on ``vae.output_device`` (ComfyUI's intermediate device); the model runs on
  ``vae.device`` in ``vae.vae_dtype``. Progress goes to ``comfy.utils.ProgressBar`` and the run
  stops at tile boundaries when the user cancels the queue.

The converted model is cached per VAE object in a ``WeakKeyDictionary``: it lives as long as
ComfyUI keeps the VAE and is dropped with it. It waits on the VAE's offload device (normally the
CPU) and is moved to the VAE's device only for the duration of a run, after asking ComfyUI's model
management to free room for it.

A VAE whose weights are not one of the supported layouts (TAESD, Stable Cascade, audio VAEs, LTX,
Hunyuan, ...) raises an error naming it; with ``fallback="full"`` the node runs the VAE's
own untiled ``encode`` / ``decode`` instead, with a warning in the log. (``"stock"``, the widget's
earlier name for it, is still accepted by :func:`encode_image` / :func:`decode_latent`; the widget
offers only ``full``.) Other exceptions are not turned into
"cannot tile": they are errors and reach ComfyUI as they are.

This module imports nothing from ComfyUI at import time: ``comfy.utils`` and
``comfy.model_management`` are looked up when a node runs and used only if present.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import adapters
from .api import run_tiled
from .errors import InvalidInputError, QuadtreeVAEError, UnsupportedArchitectureError
from .loading import detect_layout, vae_from_state_dict
from .options import FALLBACKS, MODES, Options

__all__ = [
    "NODE_CLASS_MAPPINGS",
    "NODE_DISPLAY_NAME_MAPPINGS",
    "QuadtreeVAEDecode",
    "QuadtreeVAEEncode",
    "clear_cache",
    "converted_model",
    "decode_latent",
    "encode_image",
]

log = logging.getLogger("quadtree_vae.comfy")

CATEGORY = "latent/quadtree"
_FALLBACK_ALIASES = {"stock": "full"}  # the widget's earlier name, for callers of the functions below
_HINT = "Set fallback to 'full' to run ComfyUI's own untiled VAE instead."

_cache: weakref.WeakKeyDictionary[Any, nn.Module] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


# ------------------------------------------------------------------------------------ the model


def converted_model(vae: Any) -> nn.Module:
    """The diffusers model for ComfyUI ``vae``, built from ``vae.get_sd()`` on first use, then cached.

    Raises :class:`UnsupportedArchitectureError` (with the reason) when the weights are not in a
    layout the engine tiles.
    """
    with _lock:
        try:
            model = _cache.get(vae)
        except TypeError:  # not weak-referenceable: build every time
            model = None
        if model is not None:
            return model
        model = _build(vae)
        try:
            _cache[vae] = model
        except TypeError:
            log.warning("quadtree-vae: %s cannot be weakly referenced; its converted model is not cached",
                        type(vae).__name__)
        return model


def clear_cache() -> None:
    """Forget every converted model (ComfyUI frees them anyway when it drops the VAE objects)."""
    with _lock:
        _cache.clear()


def _build(vae: Any) -> nn.Module:
    name = _vae_name(vae)
    if getattr(vae, "first_stage_model", True) is None:
        raise InvalidInputError(
            "the VAE is invalid (no weights); if it comes from a checkpoint loader, the checkpoint has no VAE"
        )
    state_dict = _state_dict(vae)
    try:
        layout = detect_layout(state_dict)
        model = vae_from_state_dict(state_dict, device=_offload_device(vae), dtype=_vae_dtype(vae))
        adapters.adapter_for(model)
    except QuadtreeVAEError as e:  # a layout or class we do not tile: a clear refusal, cause kept
        raise UnsupportedArchitectureError(
            f"quadtree-vae cannot tile this VAE ({name}): {str(e).rstrip('.')}. Supported: {adapters.SUPPORTED}. "
            f"{_HINT}"
        ) from e
    log.info("quadtree-vae: converted %s (%s layout) to %s", name, layout, type(model).__name__)
    return model


def _state_dict(vae: Any) -> dict[str, torch.Tensor]:
    get_sd = getattr(vae, "get_sd", None)
    if callable(get_sd):
        return get_sd()
    inner = getattr(vae, "first_stage_model", None)
    if isinstance(inner, nn.Module):
        return inner.state_dict()
    raise UnsupportedArchitectureError(
        f"quadtree-vae cannot tile {type(vae).__name__}: it is not a ComfyUI VAE (no get_sd() nor "
        f"first_stage_model). {_HINT}"
    )


def _vae_name(vae: Any) -> str:
    inner = getattr(vae, "first_stage_model", None)
    return type(inner).__name__ if inner is not None else type(vae).__name__


def _vae_dtype(vae: Any) -> torch.dtype:
    dtype = getattr(vae, "vae_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _device(vae: Any) -> torch.device:
    dev = getattr(vae, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _offload_device(vae: Any) -> torch.device:
    dev = getattr(getattr(vae, "patcher", None), "offload_device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _output_device(vae: Any) -> torch.device:
    dev = getattr(vae, "output_device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


# ------------------------------------------------------------------------------- ComfyUI services


def _comfy(name: str) -> ModuleType | None:
    """A ComfyUI module if ComfyUI is there (``comfy.utils``, ``comfy.model_management``), else None."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except Exception:  # not running inside ComfyUI (ImportError), or a broken install: do without
        return None


def _progress() -> Callable[[int, int], None] | None:
    """Engine progress -> ComfyUI's progress bar; also honours ComfyUI's "cancel" between tiles."""
    utils = _comfy("comfy.utils")
    mm = _comfy("comfy.model_management")
    bar_cls = getattr(utils, "ProgressBar", None)
    interrupted = getattr(mm, "throw_exception_if_processing_interrupted", None)
    if bar_cls is None and interrupted is None:
        return None
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if interrupted is not None:
            interrupted()
        if bar_cls is None:
            return
        if bar is None:
            bar = bar_cls(total)
        bar.update_absolute(done, total)

    return report


def _make_room(vae: Any, model: nn.Module, device: torch.device, working: int) -> None:
    """Ask ComfyUI to unload models from ``device`` until the weights plus ``working`` bytes fit."""
    mm = _comfy("comfy.model_management")
    free_memory = getattr(mm, "free_memory", None)
    if free_memory is None or device.type == "cpu":
        return
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        free_memory(weights + max(0, int(working)), device)
    except Exception as e:  # model management is a courtesy here, never a reason to fail
        log.debug("quadtree-vae: comfy.model_management.free_memory failed: %s", e)


def _working_estimate(vae: Any, what: str, shape: tuple[int, ...], budget: int | None) -> int:
    """Bytes to free for the run: the budget if one is set, else ComfyUI's own estimate for the
    untiled call (``vae.memory_used_encode`` / ``memory_used_decode``), which the engine then fills."""
    if budget:
        return budget
    estimate = getattr(vae, f"memory_used_{what}", None)
    if not callable(estimate):
        return 0
    try:
        return int(estimate(shape, _vae_dtype(vae)))
    except Exception:
        return 0


class _OnDevice:
    """Move the cached model to the VAE's device for one run and back to its offload device after."""

    def __init__(self, model: nn.Module, device: torch.device, home: torch.device):
        self.model, self.device, self.home = model, device, home

    def __enter__(self) -> nn.Module:
        if self.device != self.home:
            nn.Module.to(self.model, self.device)
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self.device != self.home:
            nn.Module.to(self.model, self.home)


# --------------------------------------------------------------------------------- encode / decode


def _options(vae: Any, tile_size: int, budget_gb: float, mode: str, fallback: str) -> Options:
    """The widgets' values as :class:`Options` (0 = no tile cap / no budget; budget in GiB)."""
    if isinstance(budget_gb, (int, float)) and budget_gb < 0:
        raise InvalidInputError(f"memory budget must be >= 0 GB (0 = use the free memory), not {budget_gb}")
    budget = float(budget_gb) * 2**30 if budget_gb else None
    return Options(tile_size or None, budget, mode, "trim", _FALLBACK_ALIASES.get(fallback, fallback),
                   _output_device(vae), _progress())


def _model_or_fallback(vae: Any, opts: Options) -> nn.Module | None:
    """The converted model, or None when it cannot be built and the user chose the untiled path."""
    try:
        return converted_model(vae)
    except UnsupportedArchitectureError as e:
        if opts.fallback != "full":
            raise
        log.warning("%s", str(e).replace(_HINT, "Running its own untiled encode/decode instead (fallback 'full')."))
        return None


def encode_image(
    vae: Any,
    pixels: torch.Tensor,
    tile_size: int = 0,
    budget_gb: float = 0.0,
    mode: str = "exact",
    fallback: str = "error",
) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> latent samples, tiled. ``tile_size`` in pixels (0:
    no cap), ``budget_gb`` in GiB (0: the device's free memory)."""
    opts = _options(vae, tile_size, budget_gb, mode, fallback)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise InvalidInputError(f"Quadtree VAE Encode: expected an IMAGE tensor (B, H, W, C), got {got}")
    model = _model_or_fallback(vae, opts)
    if model is None:
        return vae.encode(pixels[:, :, :, :3])

    facts = adapters.facts(model)
    x = _crop(pixels[:, :, :, :3], facts.spatial_factor * facts.latent_patch)
    x = _process_input(vae)(x.float()).movedim(-1, 1)  # (B, 3, H, W) in [-1, 1]
    if facts.temporal:
        x = x.movedim(1, 0).unsqueeze(0)  # the batch is the clip's frames: (1, 3, T, H, W)
        t = x.shape[2]
        if facts.extra_frames(t):
            log.warning("Quadtree VAE Encode: %d frames is not 1 + %dk; the last %d are dropped (as ComfyUI does)",
                        t, facts.temporal_factor, facts.extra_frames(t))
    device, home = _device(vae), _offload_device(vae)
    _make_room(vae, model, device, _working_estimate(vae, "encode", tuple(x.shape), opts.budget))
    with _OnDevice(model, device, home):
        z = run_tiled("encode", model, x, opts)
    return adapters.pack_latent(model, z.float())


def decode_latent(
    vae: Any,
    samples: torch.Tensor,
    tile_size: int = 0,
    budget_gb: float = 0.0,
    mode: str = "exact",
    fallback: str = "error",
) -> torch.Tensor:
    """ComfyUI latent samples -> IMAGE (N, H, W, 3) in [0, 1], tiled; a Wan/Qwen-Image video latent
    gives its frames as the batch (B * T' images)."""
    opts = _options(vae, tile_size, budget_gb, mode, fallback)
    if getattr(samples, "is_nested", False):  # newer ComfyUI may nest several latents; VAEDecode takes the first
        samples = samples.unbind()[0]
    if not isinstance(samples, torch.Tensor):
        raise InvalidInputError(f"Quadtree VAE Decode: expected a LATENT tensor, got {type(samples).__name__}")
    model = _model_or_fallback(vae, opts)
    if model is None:
        images = vae.decode(samples)
        return images.reshape(-1, *images.shape[-3:]) if images.dim() == 5 else images

    device, home = _device(vae), _offload_device(vae)
    _make_room(vae, model, device, _working_estimate(vae, "decode", tuple(samples.shape), opts.budget))
    z = _unpack(model, samples)
    with _OnDevice(model, device, home):
        y = run_tiled("decode", model, z, opts)
    images = _process_output(vae)(y.float())
    if images.dim() == 5:  # (B, 3, T, H, W) -> B * T images
        images = images.movedim(1, -1)
        return images.reshape(-1, *images.shape[-3:])
    return images.movedim(1, -1)


def _unpack(model: nn.Module, samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LATENT -> what the model decodes (Flux.2: unfold the packed, normalised latent)."""
    facts = adapters.facts(model)
    if facts.latent_patch == 1:
        return samples
    packed = facts.latent_channels * facts.latent_patch**2
    if samples.dim() != 4 or samples.shape[1] != packed:
        raise InvalidInputError(
            f"Quadtree VAE Decode: {facts.name} takes ComfyUI's packed latent (B, {packed}, h, w), got "
            f"{tuple(samples.shape)}"
        )
    return adapters.unpack_latent(model, samples.to(torch.float32))


def _crop(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Centre-crop H and W to multiples of ``factor`` (ComfyUI's ``vae_encode_crop_pixels``)."""
    for dim in (1, 2):
        size = pixels.shape[dim]
        keep = size // factor * factor
        if keep != size:
            if keep == 0:
                raise InvalidInputError(
                    f"Quadtree VAE Encode: the image is smaller than {factor} px ({tuple(pixels.shape)})"
                )
            pixels = pixels.narrow(dim, (size % factor) // 2, keep)
    return pixels


def _process_input(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = getattr(vae, "process_input", None)
    return fn if callable(fn) else (lambda image: image * 2.0 - 1.0)


def _process_output(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = getattr(vae, "process_output", None)
    return fn if callable(fn) else (lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0))


# ---------------------------------------------------------------------------------------- nodes

_TILE = ("INT", {
    "default": 0, "min": 0, "max": 16384, "step": 16,
    "tooltip": "Largest tile side in image pixels; 0 = no cap (the memory budget decides).",
})
_BUDGET = ("FLOAT", {
    "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25,
    "tooltip": "Device memory the VAE may use, in GiB; 0 = the device's free memory.",
})
_MODE = (list(MODES), {
    "default": "exact",
    "tooltip": "exact: equal to the untiled VAE. fast: less memory, not less time: GroupNorm statistics "
               "estimated from a subsampled pass, approximate (SD-family VAEs; same as exact for Wan).",
})
_FALLBACK = (list(FALLBACKS), {
    "default": "error",
    "tooltip": "What to do with a VAE quadtree-vae cannot tile: error, or run ComfyUI's own untiled VAE (full).",
})


def _inputs(name: str, kind: str) -> dict:
    """The node's inputs: the tensor, the VAE and the tiling options shared by both nodes."""
    return {"required": {name: (kind,), "vae": ("VAE",), "tile_size": _TILE, "memory_budget_gb": _BUDGET,
                         "mode": _MODE, "fallback": _FALLBACK}}


class QuadtreeVAEEncode:
    """Encode an IMAGE with the VAE tile by tile under a memory budget; equal to VAE Encode."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return _inputs("pixels", "IMAGE")

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes images to latents tile by tile within a memory budget, with the same result as the "
                   f"untiled VAE ({adapters.SUPPORTED}).")

    def encode(self, pixels, vae, tile_size=0, memory_budget_gb=0.0, mode="exact", fallback="error"):
        return ({"samples": encode_image(vae, pixels, tile_size, memory_budget_gb, mode, fallback)},)


class QuadtreeVAEDecode:
    """Decode a LATENT with the VAE tile by tile under a memory budget; equal to VAE Decode."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return _inputs("samples", "LATENT")

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Decodes latents to images tile by tile within a memory budget, with the same result as the "
                   f"untiled VAE ({adapters.SUPPORTED}).")

    def decode(self, samples, vae, tile_size=0, memory_budget_gb=0.0, mode="exact", fallback="error"):
        return (decode_latent(vae, samples["samples"], tile_size, memory_budget_gb, mode, fallback),)


NODE_CLASS_MAPPINGS = {
    "QuadtreeVAEEncode": QuadtreeVAEEncode,
    "QuadtreeVAEDecode": QuadtreeVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QuadtreeVAEEncode": "Quadtree VAE Encode",
    "QuadtreeVAEDecode": "Quadtree VAE Decode",
}
