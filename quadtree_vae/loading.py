"""Offline loading of VAE checkpoints into diffusers models.

Users hold VAE weights in whatever layout their tool shipped: a diffusers folder, the original
Wan 2.1 release file (also ComfyUI's ``wan_2.1_vae.safetensors`` and ``qwen_image_vae.safetensors``),
an ldm/sgm SD-family file (SD 1.x/2.x, SDXL, Flux ``ae.safetensors``, SD3), or a full SD checkpoint
with the VAE inside. Everything here turns those into one of the three diffusers classes the
engine tiles (``AutoencoderKLWan``, ``AutoencoderKLQwenImage``, ``AutoencoderKL``) without touching
the network, infers the architecture from tensor shapes (so shrunk test models load too) and refuses
anything it cannot map exactly: a VAE with silently re-initialised weights would produce plausible
but wrong images, which is worse than an error.

Two plain Python attributes are set on the models returned here (kept by ``.to()`` and deepcopy,
not by ``save_pretrained``):

* ``_quadtree_vae_arch``: the architecture name ("wan2.1", "qwen-image", "sd", "sdxl", "flux", "sd3").
* ``_quadtree_vae_random``: only on models built by :func:`random_vae`; the spec that rebuilds it,
  e.g. ``"random:sd:tiny"`` or ``"random:flux:seed=3"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import adapters, keymaps
from .errors import InvalidInputError, LoadError, UnsupportedArchitectureError
from .options import parse_device

__all__ = [
    "ARCHES",
    "ARCH_ATTR",
    "LAYOUTS",
    "RANDOM_ATTR",
    "describe",
    "detect_layout",
    "fingerprint",
    "load_vae",
    "parse_vae_spec",
    "random_vae",
    "vae_from_state_dict",
]

ARCH_ATTR = "_quadtree_vae_arch"
RANDOM_ATTR = "_quadtree_vae_random"

#: Architectures with a shipped config in ``quadtree_vae/configs/<arch>.json``.
ARCHES = ("wan2.1", "qwen-image", "sd", "sdxl", "flux", "sd3", "wan2.2", "qwen-image-2.1", "flux2")
#: What :func:`detect_layout` can return.
LAYOUTS = ("wan2.1", "wan2.2", "ldm", "ldm-noquant", "flux2")

_ARCH_ALIASES = {
    "wan": "wan2.1",
    "wan2.1": "wan2.1",
    "wan21": "wan2.1",
    "wan-2.1": "wan2.1",
    "qwen-image": "qwen-image",
    "qwenimage": "qwen-image",
    "qwen_image": "qwen-image",
    "qwen": "qwen-image",
    "sd": "sd",
    "sd1": "sd",
    "sd1.5": "sd",
    "sd15": "sd",
    "sd2": "sd",
    "sd2.1": "sd",
    "sdxl": "sdxl",
    "flux": "flux",
    "sd3": "sd3",
    "sd3.5": "sd3",
    "wan2.2": "wan2.2",
    "wan22": "wan2.2",
    "wan-2.2": "wan2.2",
    "qwen-image-2.1": "qwen-image-2.1",
    "qwen-image2.1": "qwen-image-2.1",
    "qwenimage21": "qwen-image-2.1",
    "flux2": "flux2",
    "flux.2": "flux2",
}
_LAYOUT_OF_ARCH = {
    "wan2.1": "wan2.1",
    "qwen-image": "wan2.1",
    "sd": "ldm",
    "sdxl": "ldm",
    "flux": "ldm-noquant",
    "sd3": "ldm-noquant",
    "wan2.2": "wan2.2",
    "qwen-image-2.1": "diffusers folder",  # no release file layout is known yet
    "flux2": "flux2",
}
# The keys cannot tell SD from SDXL, nor Flux from SD3: these are the defaults, `arch=` overrides.
_DEFAULT_ARCH = {"wan2.1": "wan2.1", "wan2.2": "wan2.2", "ldm": "sd", "ldm-noquant": "flux", "flux2": "flux2"}

# Small configs for fast tests. They shrink widths and depths only; latent channels, spatial and
# temporal factors, mid-block attention and quant convs stay as in the real model, so code that
# works on a tiny model sees the same interface as on the full one.
_TINY_SD = {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64}
_TINY = {
    "wan2.1": {"base_dim": 8},
    "qwen-image": {"base_dim": 8},
    "sd": _TINY_SD,
    "sdxl": _TINY_SD,
    "flux": _TINY_SD,
    "sd3": _TINY_SD,
    "wan2.2": {"base_dim": 8, "decoder_base_dim": 16},
    "qwen-image-2.1": {"base_dim": 8, "decoder_base_dim": 8},
    "flux2": _TINY_SD,
}

# Keys that identify a layout whatever prefix they sit under.
_WAN_ANCHORS = ("decoder.middle.0.residual.0.gamma", "encoder.middle.0.residual.0.gamma")
_LDM_ANCHORS = ("decoder.mid.block_1.conv1.weight", "encoder.mid.block_1.conv1.weight")
_DIFFUSERS_ANCHORS = ("decoder.mid_block.resnets.0.conv1.weight", "encoder.mid_block.resnets.0.conv1.weight")
_PREFIX_PREFERENCE = ("", "first_stage_model.", "vae.")
# Top-level names of the VAE's own modules in each layout; anything else (UNet, text encoders,
# `loss.*` discriminator weights, EMA copies) is not part of the VAE and is dropped.
_WAN_NAMESPACES = ("encoder.", "decoder.", "conv1.", "conv2.")
_LDM_NAMESPACES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")  # bn: Flux.2

_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_TORCH_EXTS = (".pt", ".pth", ".ckpt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model", "module")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

_FINGERPRINT_SAMPLES = 1024


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def load_vae(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    arch: str | None = None,
) -> nn.Module:
    """Load a VAE from a diffusers folder or a single checkpoint file, offline, in eval mode.

    ``path`` may be a diffusers model folder (``config.json`` + weights), a pipeline folder with a
    ``vae/`` subfolder, or a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` file in the
    original Wan 2.1 layout or the ldm/sgm SD-family layout (also prefixed, or inside a full SD
    checkpoint). Pickle files are read with ``weights_only=True``, so they never run code.

    ``arch`` picks what the keys cannot tell apart: ``"qwen-image"`` for a Wan-layout file (default
    ``"wan2.1"``), ``"sdxl"`` for an SD-layout file (default ``"sd"``), ``"sd3"`` for a Flux-layout
    file (default ``"flux"``); it sets the class and the scaling/shift factors. For a folder the
    folder's ``config.json`` wins and ``arch`` only labels the model (it must fit the class).

    Wan 2.2 files (z_dim 48, residual blocks, patch size 2) are recognised but refused with a
    :class:`LoadError`: diffusers ships no single-file converter for them yet. A Wan 2.2 diffusers
    folder loads like any other folder.

    ``dtype=None`` gives float32 whatever the file stores; ``device=None`` keeps the model on CPU.
    """
    device_ = _parse_device(device)
    dtype_ = _parse_dtype(dtype)
    arch_ = _normalize_arch(arch)
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"load_vae: path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise LoadError(f"{p}: no such file or directory")
    if p.is_dir():
        return _load_folder(p, arch_, device_, dtype_)
    if p.name.startswith("diffusion_pytorch_model") and (p.parent / "config.json").is_file():
        # A diffusers weights file given alone: its keys only make sense with the folder's config.
        return _load_folder(p.parent, arch_, device_, dtype_)
    state_dict = _read_state_dict(p)
    return _build_from_state_dict(state_dict, arch_, str(p), device_, dtype_)


def vae_from_state_dict(
    state_dict: Mapping[str, Any],
    arch: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """Build an eval-mode diffusers VAE from weights already in memory, in an original key layout.

    This is the entry point for hosts such as ComfyUI that hand over the VAE's weights with the
    original keys (ldm keys for SD-family VAEs, Wan release keys for Wan/Qwen-Image). Detection,
    prefix stripping, conversion and strict loading are the same as for :func:`load_vae` on a file.
    The input tensors are copied, never aliased.
    """
    if not isinstance(state_dict, Mapping):
        raise InvalidInputError(
            f"vae_from_state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}"
        )
    return _build_from_state_dict(
        state_dict, _normalize_arch(arch), "state dict", _parse_device(device), _parse_dtype(dtype)
    )


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Name the key layout of a VAE state dict: "wan2.1", "wan2.2", "ldm" or "ldm-noquant".

    "ldm" is the SD-family layout with ``quant_conv``/``post_quant_conv`` (SD 1.x/2.x, SDXL);
    "ldm-noquant" is the same without them (Flux, SD3). Wrappers (``state_dict``/``model``/``module``)
    and a ``first_stage_model.``/``vae.`` (or any other) prefix are looked through. Raises
    :class:`LoadError` when no known layout is found.
    """
    tensors = _tensors_only(state_dict, "state dict")
    family, prefix = _locate(tensors, "state dict")
    return _classify(family, _extract(tensors, family, prefix))


def random_vae(
    arch: str,
    seed: int = 0,
    tiny: bool = False,
    dtype: str | torch.dtype | None = None,
    *,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build the real diffusers architecture for ``arch`` with seeded random weights, offline.

    This is the embedded default used when no weights are at hand (tests, demos, benchmarks): the
    compute graph, shapes and memory use are those of the real model. ``tiny=True`` shrinks widths
    and depths (latent channels, the 8x spatial / 4x temporal factors, attention and quant convs stay
    as in the real model). Weights come from diffusers' default init under ``torch.manual_seed(seed)``
    inside a forked RNG, so the same seed gives the same weights and the caller's RNG is untouched.
    The model is marked with ``_quadtree_vae_random`` so :func:`describe` reports ``random: True``.
    """
    arch_ = _normalize_arch(arch)
    if arch_ is None:
        raise InvalidInputError(f"random_vae: arch is required, one of {', '.join(ARCHES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"random_vae: seed must be a non-negative int, got {seed!r}")
    device_ = _parse_device(device)
    dtype_ = _parse_dtype(dtype)
    config = _arch_config(arch_)
    if tiny:
        config.update(_TINY[arch_])
    cls = _class_for(config["_class_name"], f"config for {arch_}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**_constructor_kwargs(config))
    model.eval()
    _place(model, device_, dtype_ or torch.float32)
    spec = f"random:{arch_}" + (":tiny" if tiny else "") + (f":seed={seed}" if seed else "")
    setattr(model, RANDOM_ATTR, spec)
    setattr(model, ARCH_ATTR, arch_)
    return model


def parse_vae_spec(
    spec: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    arch: str | None = None,
) -> nn.Module:
    """Resolve the command line's ``--vae`` value: ``random:ARCH[:tiny][:seed=N]`` or a path.

    A path goes to :func:`load_vae` (with ``arch`` as the layout hint); a ``random:`` spec goes to
    :func:`random_vae`. Options after the arch may come in any order.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError("--vae: expected random:ARCH[:tiny][:seed=N] or a path, got an empty value")
    spec = spec.strip()
    if not spec.lower().startswith("random:") and spec.lower() != "random":
        return load_vae(spec, device, dtype, arch=arch)
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise InvalidInputError(f"--vae {spec!r}: name an architecture, e.g. random:{ARCHES[0]} ({', '.join(ARCHES)})")
    rand_arch = _normalize_arch(parts[0])
    if arch is not None and _normalize_arch(arch) != rand_arch:
        raise InvalidInputError(f"--vae {spec!r} builds {rand_arch!r} but arch={arch!r} was also given")
    tiny = False
    seed = 0
    for opt in parts[1:]:
        o = opt.strip().lower()
        if o == "tiny":
            tiny = True
        elif o.startswith("seed="):
            try:
                seed = int(o[5:])
            except ValueError as e:
                raise InvalidInputError(f"--vae {spec!r}: seed must be an integer, got {opt[5:]!r}") from e
        else:
            raise InvalidInputError(f"--vae {spec!r}: unknown option {opt!r}; allowed: tiny, seed=N")
    return random_vae(rand_arch, seed=seed, tiny=tiny, dtype=dtype, device=device)


def fingerprint(vae: nn.Module, full: bool = False) -> str:
    """A 16-hex-digit digest identifying a model's weights, for cache keys and run reports.

    Covers the class name and every state-dict entry's name, dtype and shape plus, by default,
    1024 evenly spaced values of each tensor (exact bytes, so the digest is the same on CPU and GPU
    and takes milliseconds for a 250 MB model); ``full=True`` hashes every byte instead (about a
    second per GB). It does not cover the config (scaling/shift factors), which does not change what
    encode/decode compute. A dtype cast changes the digest.
    """
    if not isinstance(vae, nn.Module):
        raise InvalidInputError(f"fingerprint: expected a torch.nn.Module, got {type(vae).__name__}")
    h = hashlib.sha256()
    h.update(type(vae).__name__.encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach()
        h.update(f"\0{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        if n == 0:
            continue
        if not full and n > _FINGERPRINT_SAMPLES:
            idx = torch.arange(_FINGERPRINT_SAMPLES, dtype=torch.int64) * (n - 1) // (_FINGERPRINT_SAMPLES - 1)
            flat = flat[idx.to(flat.device)]
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def describe(vae: nn.Module) -> dict[str, Any]:
    """Summarise a VAE for logs and reports: class, arch, size, latent channels, compression factors.

    ``arch`` comes from the ``_quadtree_vae_arch`` mark set by this module's loaders, else it is
    guessed from the class and config ("unknown" when it cannot be). ``latent_channels``,
    ``spatial_factor`` and ``temporal_factor`` (None for image VAEs) are the model's adapter's
    :class:`~quadtree_vae.adapters.common.Facts` (all None for a model no adapter tiles).
    ``random`` is True for models built by :func:`random_vae`.
    """
    if not isinstance(vae, nn.Module):
        raise InvalidInputError(f"describe: expected a torch.nn.Module, got {type(vae).__name__}")
    try:
        facts = adapters.facts(vae)
    except UnsupportedArchitectureError:
        facts = None
    return {
        "class": type(vae).__name__,
        "arch": getattr(vae, ARCH_ATTR, None) or _guess_arch(vae),
        "params": sum(p.numel() for p in vae.parameters()),
        "latent_channels": facts.latent_channels if facts else None,
        "spatial_factor": facts.spatial_factor if facts else None,
        "temporal_factor": facts.temporal_factor if facts else None,
        "random": bool(getattr(vae, RANDOM_ATTR, None)),
    }


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def _normalize_arch(arch: str | None) -> str | None:
    if arch is None:
        return None
    if not isinstance(arch, str) or arch.strip().lower() not in _ARCH_ALIASES:
        raise InvalidInputError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHES)}")
    return _ARCH_ALIASES[arch.strip().lower()]


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InvalidInputError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise InvalidInputError(f"unknown dtype {dtype!r}; use float32/fp32, float16/fp16 or bfloat16/bf16")


def _parse_device(device: str | torch.device | None) -> torch.device | None:
    # Checked before reading a large file rather than after.
    return None if device is None else parse_device(device)


# --------------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif suffix in _TORCH_EXTS:
        obj = _read_torch(path)
    else:
        raise LoadError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; expected .safetensors, "
            f"{', '.join(_TORCH_EXTS)} or a diffusers folder"
        )
    return _tensors_only(obj, str(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # Validate the header ourselves first: safetensors' own errors do not say "truncated".
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{path}: truncated safetensors header: the file has only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _SAFETENSORS_MAX_HEADER:
            raise LoadError(f"{path}: not a safetensors file: its first 8 bytes give a header length of {n} bytes")
        if 8 + n > size:
            raise LoadError(
                f"{path}: truncated safetensors header: it declares {n} header bytes but only {size - 8} follow"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise LoadError(f"{path}: corrupt safetensors header (entry {name!r} has no data_offsets)") from e
    if 8 + n + end > size:
        raise LoadError(
            f"{path}: truncated safetensors file: the header describes {end} bytes of tensor data "
            f"but only {size - 8 - n} are present"
        )
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise LoadError(f"{path}: corrupt safetensors file: {e}") from e


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        blocked = next((ln for ln in lines if "GLOBAL" in ln), None)
        if blocked is not None:
            raise LoadError(
                f"{path}: refused: the pickle holds objects other than tensors and plain containers, which "
                f"are never unpickled here (weights_only=True). {blocked} Re-save the weights as "
                f".safetensors from a trusted environment."
            ) from e
        # Not a blocked class: the bytes are not a valid pickle. torch's own text is a long preamble;
        # keep the line after "WeightsUnpickler error" when there is one.
        marker = next((i for i, ln in enumerate(lines) if "WeightsUnpickler error" in ln), None)
        detail = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else (lines or [""])[0]
        raise LoadError(f"{path}: not a readable PyTorch checkpoint (corrupt pickle: {detail})") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LoadError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from e


def _tensors_only(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style containers and keep only the tensor entries."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise LoadError(f"{source}: expected a mapping of names to tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(repr, list(obj.keys())[:8]))
        raise LoadError(f"{source}: no tensors found (top-level keys: {keys or 'none'})")
    return tensors


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------


def _prefixes(keys: list[str], anchors: tuple[str, ...]) -> set[str]:
    found = set()
    for k in keys:
        for a in anchors:
            if k.endswith(a):
                p = k[: len(k) - len(a)]
                if p == "" or p.endswith("."):
                    found.add(p)
    return found


def _pick_prefix(prefixes: set[str], what: str, source: str) -> str:
    if len(prefixes) == 1:
        return next(iter(prefixes))
    for p in _PREFIX_PREFERENCE:
        if p in prefixes:
            return p
    raise LoadError(f"{source}: found {what} weights under several prefixes ({sorted(prefixes)}); pass one VAE")


def _locate(sd: Mapping[str, torch.Tensor], source: str) -> tuple[str, str]:
    """Return ("wan" | "ldm", prefix) for the VAE inside ``sd``."""
    keys = list(sd.keys())
    wan = _prefixes(keys, _WAN_ANCHORS)
    ldm = _prefixes(keys, _LDM_ANCHORS)
    if wan and ldm:
        raise LoadError(
            f"{source}: holds both Wan-layout (prefix {sorted(wan)}) and ldm-layout (prefix {sorted(ldm)}) "
            f"VAE weights; pass one VAE"
        )
    if wan:
        return "wan", _pick_prefix(wan, "Wan-layout", source)
    if ldm:
        return "ldm", _pick_prefix(ldm, "ldm-layout", source)
    hint = ""
    if _prefixes(keys, _DIFFUSERS_ANCHORS):
        hint = (
            " These keys are in diffusers' own layout: pass the folder that holds this file and its "
            "config.json instead."
        )
    sample = ", ".join(repr(k) for k in keys[:5])
    raise LoadError(
        f"{source}: found {len(keys)} keys, none of the known VAE layouts: looked for "
        f"{_WAN_ANCHORS[0]!r} (original Wan 2.1 / Qwen-Image) and {_LDM_ANCHORS[0]!r} (ldm/sgm: SD, SDXL, "
        f"Flux, SD3), bare or under a prefix such as 'first_stage_model.' or 'vae.'; first keys: {sample}.{hint}"
    )


def _extract(sd: Mapping[str, torch.Tensor], family: str, prefix: str) -> dict[str, torch.Tensor]:
    spaces = _WAN_NAMESPACES if family == "wan" else _LDM_NAMESPACES
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            rest = k[len(prefix) :]
            if rest.startswith(spaces):
                out[rest] = v
    return out


def _classify(family: str, vae_sd: Mapping[str, torch.Tensor]) -> str:
    if family == "wan":
        if keymaps.is_wan22(vae_sd):
            return "wan2.2"
        conv_in = vae_sd.get("encoder.conv1.weight")
        head = vae_sd.get("encoder.head.2.weight")
        if (conv_in is not None and conv_in.ndim == 5 and conv_in.shape[1] == 12) or (
            head is not None and head.shape[0] == 96
        ):
            return "wan2.2"  # patchified 12-channel input or a 48-channel latent
        return "wan2.1"
    if keymaps.is_flux2(vae_sd):
        return "flux2"
    if "quant_conv.weight" in vae_sd or "post_quant_conv.weight" in vae_sd:
        return "ldm"
    return "ldm-noquant"


# --------------------------------------------------------------------------------------------------
# config inference
# --------------------------------------------------------------------------------------------------


def _arch_config(arch: str) -> dict[str, Any]:
    text = resources.files("quadtree_vae").joinpath("configs", f"{arch}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _constructor_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _need(sd: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise LoadError(f"{source}: {what} weights lack {key!r}, which is needed to infer the architecture")
    return sd[key]


def _wan_config(sd: Mapping[str, torch.Tensor], arch: str, source: str) -> dict[str, Any]:
    what = "Wan-layout"
    conv_in = _need(sd, "encoder.conv1.weight", source, what)
    head = _need(sd, "encoder.head.2.weight", source, what)
    dec_head = _need(sd, "decoder.head.2.weight", source, what)
    base_dim, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    z_dim = int(head.shape[0]) // 2
    out_channels, dec_width = int(dec_head.shape[0]), int(dec_head.shape[1])

    # Walk encoder.downsamples.<i>: residual blocks, closed by a resample (with time_conv when the
    # level also halves time). This gives dim_mult, num_res_blocks and temperal_downsample.
    kinds: dict[int, set[str]] = {}
    for k in sd:
        m = re.match(r"encoder\.downsamples\.(\d+)\.([A-Za-z_]+)", k)
        if m:
            kinds.setdefault(int(m.group(1)), set()).add(m.group(2))
    levels: list[tuple[int, int]] = []  # (residual blocks, width) per level
    temporal: list[bool] = []
    count, width = 0, base_dim
    for i in sorted(kinds):
        ks = kinds[i]
        if "residual" in ks:
            count += 1
            width = int(_need(sd, f"encoder.downsamples.{i}.residual.6.weight", source, what).shape[0])
        elif "resample" in ks:
            levels.append((count, width))
            temporal.append("time_conv" in ks)
            count = 0
        else:
            raise LoadError(
                f"{source}: Wan-layout VAE with attention inside the encoder's down blocks "
                f"(encoder.downsamples.{i}); diffusers' Wan VAE does not support attn_scales"
            )
    if count:
        levels.append((count, width))
    if not levels:
        raise LoadError(f"{source}: Wan-layout weights have no encoder.downsamples.* blocks")
    blocks = {c for c, _ in levels}
    if any(w % base_dim for _, w in levels) or len(blocks) != 1:
        raise LoadError(f"{source}: inconsistent Wan encoder levels {levels} (base width {base_dim})")
    num_res_blocks = blocks.pop()
    dim_mult = [w // base_dim for _, w in levels]
    if len(levels) != 4 or num_res_blocks != 2:
        raise LoadError(
            f"{source}: Wan-layout VAE with {len(levels)} levels of {num_res_blocks} residual blocks; diffusers' "
            f"convert_wan_vae_to_diffusers maps only the released layout (4 levels of 2 blocks)"
        )
    decoder_base_dim = dec_width // dim_mult[0]

    config = _arch_config(arch)
    update: dict[str, Any] = {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal,
    }
    if arch == "qwen-image":
        if out_channels != in_channels or decoder_base_dim != base_dim:
            raise LoadError(
                f"{source}: AutoencoderKLQwenImage needs equal in/out channels and encoder/decoder widths; "
                f"this file has {in_channels}->{out_channels} channels, widths {base_dim}/{decoder_base_dim}"
            )
        update["input_channels"] = in_channels
    else:
        update.update(
            decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            scale_factor_temporal=2 ** sum(temporal),
            scale_factor_spatial=2 ** len(temporal),
        )
    if len(config.get("latents_mean") or []) != z_dim:
        # The shipped statistics belong to the 16-channel release; a different width has none.
        update["latents_mean"] = [0.0] * z_dim
        update["latents_std"] = [1.0] * z_dim
    config.update(update)
    return config


def _wan22_config(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The released Wan 2.2 config with the widths, depths and factors read off the weights."""
    config = _arch_config("wan2.2")
    config.update(keymaps.wan22_config(sd, source))
    if len(config["latents_mean"]) != config["z_dim"]:  # the shipped statistics belong to z_dim 48
        config["latents_mean"] = [0.0] * config["z_dim"]
        config["latents_std"] = [1.0] * config["z_dim"]
    return config


def _norm_groups(channels: list[int]) -> int:
    """ldm's Normalize always uses 32 groups; narrower test models fall back to the largest
    power-of-two divisor of 32 that divides every width (the files do not record the count)."""
    groups = 32
    while groups > 1 and any(c % groups for c in channels):
        groups //= 2
    return groups


def _ldm_config(sd: Mapping[str, torch.Tensor], arch: str, source: str) -> dict[str, Any]:
    what = "ldm-layout"
    enc_in = _need(sd, "encoder.conv_in.weight", source, what)
    dec_in = _need(sd, "decoder.conv_in.weight", source, what)
    dec_out = _need(sd, "decoder.conv_out.weight", source, what)
    down = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    up = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    if not down or down != list(range(len(down))) or up != down:
        raise LoadError(
            f"{source}: ldm-layout weights have inconsistent block indices (encoder.down {down}, decoder.up {up})"
        )
    attn = [k for k in sd if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]
    if attn:
        raise LoadError(
            f"{source}: ldm-layout VAE with attention in its down/up blocks (e.g. {attn[0]!r}); "
            f"diffusers' AutoencoderKL has none there"
        )
    block_out = [int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", source, what).shape[0]) for i in down]
    # Count complete blocks (those with a conv1), so one stray key cannot change the depth.
    layers = len({m.group(1) for k in sd if (m := re.fullmatch(r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight", k))})
    n = len(block_out)
    config = _arch_config(arch)
    config.update(
        in_channels=int(enc_in.shape[1]),
        out_channels=int(dec_out.shape[0]),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=block_out,
        layers_per_block=layers,
        latent_channels=int(dec_in.shape[1]),
        norm_num_groups=_norm_groups(block_out),
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention=any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in sd),
    )
    return config


# --------------------------------------------------------------------------------------------------
# building models
# --------------------------------------------------------------------------------------------------


def _class_for(name: Any, source: str) -> type[nn.Module]:
    import diffusers

    if name not in adapters.CLASS_NAMES:
        raise LoadError(f"{source}: unsupported model class {name!r}; supported: {adapters.SUPPORTED}")
    return getattr(diffusers, name)


def _build_from_state_dict(
    state_dict: Mapping[str, Any],
    arch: str | None,
    source: str,
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    tensors = _tensors_only(state_dict, source)
    family, prefix = _locate(tensors, source)
    vae_sd = _extract(tensors, family, prefix)
    layout = _classify(family, vae_sd)
    if arch is None:
        arch = _DEFAULT_ARCH[layout]
    elif _LAYOUT_OF_ARCH[arch] != layout:
        raise InvalidInputError(
            f"{source}: arch={arch!r} needs weights in the {_LAYOUT_OF_ARCH[arch]!r} layout but these are "
            f"{layout!r}; use one of "
            f"{', '.join(a for a, lay in _LAYOUT_OF_ARCH.items() if lay == layout)} or leave arch unset"
        )
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_wan_vae_to_diffusers

    if layout == "wan2.1":
        config = _wan_config(vae_sd, arch, source)
        converted = convert_wan_vae_to_diffusers(vae_sd)
    elif layout == "wan2.2":
        config = _wan22_config(vae_sd, source)
        converted = keymaps.wan22_to_diffusers(vae_sd, source)
    elif layout == "flux2":
        ldm_sd, bn = keymaps.flux2_to_ldm(vae_sd)
        config = _ldm_config(ldm_sd, arch, source)
        config.update(keymaps.flux2_config(bn, config["latent_channels"], source))
        converted = {**convert_ldm_vae_checkpoint(ldm_sd, config), **bn}
    else:
        config = _ldm_config(vae_sd, arch, source)
        converted = convert_ldm_vae_checkpoint(vae_sd, config)
    converted = {k: v for k, v in converted.items() if isinstance(v, torch.Tensor)}
    unused = _unused_keys(vae_sd, converted)
    model = _instantiate(config, converted, unused, source, device, dtype)
    setattr(model, ARCH_ATTR, arch)
    return model


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset())


def _unused_keys(src: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor]) -> list[str]:
    """Source keys the converter dropped (diffusers' ldm converter skips what it does not know).

    Converted tensors are the source tensors or views of them, so storage identity tells which
    source entries made it through."""
    used = {_storage_key(v) for v in converted.values()}
    return sorted(k for k, v in src.items() if _storage_key(v) not in used)


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _instantiate(
    config: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    unused: list[str],
    source: str,
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    cls = _class_for(config["_class_name"], source)
    kwargs = _constructor_kwargs(config)
    # Build without allocating or randomly initialising (1-2 s for the full Wan VAE), then copy
    # the weights straight onto the target device in the target dtype.
    with torch.device("meta"):
        model = cls(**kwargs)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected)) + [f"{k} (original key, not mapped)" for k in unused]
    mismatched = sorted(
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(weights) & set(expected)
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (file vs model): {_few(mismatched)}")
        raise LoadError(
            f"{source}: weights do not fit the inferred {cls.__name__} ({_config_summary(kwargs)}): {'; '.join(parts)}"
        )
    if any(name not in expected for name, _ in model.named_buffers()):
        # A buffer the state dict does not restore would stay uninitialised: build for real.
        model = cls(**kwargs)
        _place(model, device, dtype or torch.float32)
    else:
        _place(model, None, dtype or torch.float32)
        model.to_empty(device=device or torch.device("cpu"))
    model.load_state_dict(weights, strict=True)
    model.eval()
    return model


def _place(model: nn.Module, device: torch.device | None, dtype: torch.dtype) -> None:
    """Move/cast in place. Calls nn.Module.to directly: diffusers' ModelMixin.to logs a spurious
    "should be kept in float32: []" warning on every dtype cast of these VAE classes."""
    nn.Module.to(model, device=device, dtype=dtype)


def _config_summary(kwargs: Mapping[str, Any]) -> str:
    keys = (
        "base_dim",
        "z_dim",
        "dim_mult",
        "num_res_blocks",
        "block_out_channels",
        "layers_per_block",
        "latent_channels",
        "norm_num_groups",
        "use_quant_conv",
        "mid_block_add_attention",
    )
    return ", ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs)


def _load_folder(path: Path, arch: str | None, device: torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    folder = path
    if not (folder / "config.json").is_file():
        if (folder / "vae" / "config.json").is_file():
            folder = folder / "vae"
        else:
            raise LoadError(
                f"{path}: directory without config.json (nor vae/config.json); expected a diffusers VAE "
                f"folder or a pipeline folder with a vae/ subfolder"
            )
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{cfg_path}: unreadable config.json ({e})") from e
    if not isinstance(cfg, dict):
        raise LoadError(f"{cfg_path}: config.json is not a JSON object")
    cls = _class_for(cfg.get("_class_name"), str(cfg_path))
    if arch is not None:
        want = _arch_config(arch)["_class_name"]
        if want != cls.__name__:
            raise InvalidInputError(f"{folder}: arch={arch!r} needs {want} but config.json says {cls.__name__}")
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as e:  # diffusers raises OSError/EnvironmentError/ValueError/RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{folder}: diffusers could not load this {cls.__name__} folder: {first}") from e
    parts = []
    for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys")):
        keys = sorted(map(str, info.get(key) or []))
        if keys:
            parts.append(f"{len(keys)} {label}: {_few(keys)}")
    mism = info.get("mismatched_keys") or []
    if mism:
        parts.append(f"{len(mism)} with other shapes: {_few([str(m[0]) for m in mism])}")
    errs = info.get("error_msgs") or []
    if errs:
        parts.append(f"errors: {_few([str(e) for e in errs], 2)}")
    if parts:
        raise LoadError(f"{folder}: weights do not fit config.json ({cls.__name__}): {'; '.join(parts)}")
    _place(model, device, dtype or torch.float32)
    model.eval()
    setattr(model, ARCH_ATTR, arch or _guess_arch(model))
    return model


# --------------------------------------------------------------------------------------------------
# describing models
# --------------------------------------------------------------------------------------------------


def _config_dict(vae: nn.Module) -> dict[str, Any]:
    cfg = getattr(vae, "config", None)
    if cfg is None:
        return {}
    try:
        return dict(cfg)
    except (TypeError, ValueError):
        return {}


def _kind(vae: nn.Module) -> str | None:
    names = {c.__name__ for c in type(vae).__mro__}
    if "AutoencoderKLQwenImage" in names:
        return "qwen"
    if "AutoencoderKLWan" in names:
        return "wan"
    if "AutoencoderKL" in names:
        return "kl"
    return None


def _guess_arch(vae: nn.Module) -> str:
    by_class = {"AutoencoderKLQwenImage21": "qwen-image-2.1", "AutoencoderKLFlux2": "flux2"}
    if type(vae).__name__ in by_class:
        return by_class[type(vae).__name__]
    kind = _kind(vae)
    cfg = _config_dict(vae)
    if kind == "qwen":
        return "qwen-image"
    if kind == "wan":
        return "wan2.2" if cfg.get("is_residual") or cfg.get("z_dim") == 48 else "wan2.1"
    if kind != "kl":
        return "unknown"
    latent = cfg.get("latent_channels")
    quant = bool(cfg.get("use_quant_conv", True))
    scaling = cfg.get("scaling_factor")
    for arch in ("sd", "sdxl", "flux", "sd3"):
        fam = _arch_config(arch)
        if (
            fam["latent_channels"] == latent
            and fam["use_quant_conv"] == quant
            and scaling is not None
            and abs(float(scaling) - fam["scaling_factor"]) < 1e-6
        ):
            return arch
    if latent == 4 and quant:
        return "sd"
    if latent == 16 and not quant:
        return "flux"
    return "ldm"
