"""The architectures we know by name: shipped configs, seeded random defaults, and naming a model.

Each name in :data:`ARCHES` has a shipped config in ``quadtree_vae/configs/<arch>.json`` (the
released model's diffusers config). :func:`random_vae` builds it with seeded random weights, the
embedded default when no weights are at hand; ``tiny=True`` shrinks widths and depths only.
:func:`describe` and :func:`fingerprint` identify a model for logs, caches and run reports.

Two plain Python attributes mark models (kept by ``.to()`` and deepcopy, not by ``save_pretrained``):

* ``_quadtree_vae_arch``: the architecture name ("wan2.1", "qwen-image", "sd", "sdxl", "flux", "sd3", ...).
* ``_quadtree_vae_random``: only on models built by :func:`random_vae`; the spec that rebuilds it,
  e.g. ``"random:sd:tiny"`` or ``"random:flux:seed=3"``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch
from torch import nn

from . import adapters
from .errors import InvalidInputError, LoadError, UnsupportedArchitectureError
from .options import parse_device as _parse_device_option

__all__ = [
    "ARCHES",
    "ARCH_ATTR",
    "RANDOM_ATTR",
    "describe",
    "fingerprint",
    "is_random_spec",
    "random_from_spec",
    "random_vae",
]

ARCH_ATTR = "_quadtree_vae_arch"
RANDOM_ATTR = "_quadtree_vae_random"

#: Architectures with a shipped config in ``quadtree_vae/configs/<arch>.json``.
ARCHES = ("wan2.1", "qwen-image", "sd", "sdxl", "flux", "sd3", "wan2.2", "qwen-image-2.1", "flux2")

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
    arch_ = normalize_arch(arch)
    if arch_ is None:
        raise InvalidInputError(f"random_vae: arch is required, one of {', '.join(ARCHES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"random_vae: seed must be a non-negative int, got {seed!r}")
    device_ = parse_device(device)
    dtype_ = parse_dtype(dtype)
    config = arch_config(arch_)
    if tiny:
        config.update(_TINY[arch_])
    cls = class_for(config["_class_name"], f"config for {arch_}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**constructor_kwargs(config))
    model.eval()
    place(model, device_, dtype_ or torch.float32)
    spec = f"random:{arch_}" + (":tiny" if tiny else "") + (f":seed={seed}" if seed else "")
    setattr(model, RANDOM_ATTR, spec)
    setattr(model, ARCH_ATTR, arch_)
    return model


def is_random_spec(spec: str) -> bool:
    """Whether a ``--vae`` / :func:`~quadtree_vae.load_vae` value names a random model, not a path."""
    lowered = spec.strip().lower()
    return lowered == "random" or lowered.startswith("random:")


def random_from_spec(
    spec: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    arch: str | None = None,
) -> nn.Module:
    """Build the model a ``random:ARCH[:tiny][:seed=N]`` spec names; options may come in any order."""
    spec = spec.strip()
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise InvalidInputError(f"--vae {spec!r}: name an architecture, e.g. random:{ARCHES[0]} ({', '.join(ARCHES)})")
    rand_arch = normalize_arch(parts[0])
    if arch is not None and normalize_arch(arch) != rand_arch:
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
        "arch": getattr(vae, ARCH_ATTR, None) or guess_arch(vae),
        "params": sum(p.numel() for p in vae.parameters()),
        "latent_channels": facts.latent_channels if facts else None,
        "spatial_factor": facts.spatial_factor if facts else None,
        "temporal_factor": facts.temporal_factor if facts else None,
        "random": bool(getattr(vae, RANDOM_ATTR, None)),
    }


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------


def normalize_arch(arch: str | None) -> str | None:
    if arch is None:
        return None
    if not isinstance(arch, str) or arch.strip().lower() not in _ARCH_ALIASES:
        raise InvalidInputError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHES)}")
    return _ARCH_ALIASES[arch.strip().lower()]


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
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


def parse_device(device: str | torch.device | None) -> torch.device | None:
    # Checked before reading a large file rather than after.
    return None if device is None else _parse_device_option(device)


def arch_config(arch: str) -> dict[str, Any]:
    text = resources.files("quadtree_vae").joinpath("configs", f"{arch}.json").read_text(encoding="utf-8")
    return json.loads(text)


def constructor_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def class_for(name: Any, source: str) -> type[nn.Module]:
    import diffusers

    if name not in adapters.CLASS_NAMES:
        raise LoadError(f"{source}: unsupported model class {name!r}; supported: {adapters.SUPPORTED}")
    return getattr(diffusers, name)


def place(model: nn.Module, device: torch.device | None, dtype: torch.dtype) -> None:
    """Move/cast in place. Calls nn.Module.to directly: diffusers' ModelMixin.to logs a spurious
    "should be kept in float32: []" warning on every dtype cast of these VAE classes."""
    nn.Module.to(model, device=device, dtype=dtype)


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


def guess_arch(vae: nn.Module) -> str:
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
        fam = arch_config(arch)
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
