"""Offline loading of VAE checkpoints into the diffusers classes the engine tiles.

Users hold VAE weights in whatever layout their tool shipped. Each layout takes one path:

* a diffusers folder (or a pipeline folder with ``vae/``): diffusers' own ``from_pretrained``,
  offline, with its missing/unexpected/mismatched keys turned into a refusal;
* the original Wan 2.1 / Qwen-Image release layout (also ComfyUI's ``wan_2.1_vae.safetensors`` and
  ``qwen_image_vae.safetensors``): diffusers' ``convert_wan_vae_to_diffusers``;
* the ldm/sgm SD-family layout (SD 1.x/2.x, SDXL, Flux ``ae.safetensors``, SD3, also prefixed or
  inside a full checkpoint): diffusers' ``convert_ldm_vae_checkpoint``;
* the Wan 2.2 release layout and the Flux.2 ``ae.safetensors`` layout, which diffusers cannot
  read on its own: our key maps in :mod:`quadtree_vae.keymaps`;
* ``random:ARCH[:tiny][:seed=N]``: seeded defaults from :mod:`quadtree_vae.archs`.

Files are read by :mod:`quadtree_vae.checkpoints` (safetensors, or ``torch.load`` with
``weights_only=True``). For the release layouts the architecture is read off the tensor shapes
(:mod:`quadtree_vae.keymaps`, starting from the shipped config of the arch), so shrunk test models
load too, and the weights are then loaded with ``strict=True`` plus a check that the converter
dropped no source key: a VAE with silently re-initialised weights would produce plausible but wrong
images, which is worse than an error.

Why not diffusers' ``from_single_file(..., config=<shipped config>)``: it loads with
``strict=False`` (a missing weight keeps its random init, an unused one is only logged), its
converter's output is not returned, so no check can be run afterwards without converting twice;
without ``accelerate`` (not a dependency) it randomly initialises the whole model first, 5-6x
slower than building on the meta device here; and it does not take AutoencoderKLQwenImage or
AutoencoderKLFlux2. We call the same converters it calls, and build the model ourselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import archs, keymaps
from .archs import ARCH_ATTR, ARCHES, RANDOM_ATTR, describe, fingerprint, random_vae
from .checkpoints import headline, read_state_dict, tensors_only
from .errors import InvalidInputError, LoadError

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

#: What :func:`detect_layout` can return.
LAYOUTS = ("wan2.1", "wan2.2", "ldm", "ldm-noquant", "flux2")

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

# Keys that identify a layout whatever prefix they sit under.
_WAN_ANCHORS = ("decoder.middle.0.residual.0.gamma", "encoder.middle.0.residual.0.gamma")
_LDM_ANCHORS = ("decoder.mid.block_1.conv1.weight", "encoder.mid.block_1.conv1.weight")
_DIFFUSERS_ANCHORS = ("decoder.mid_block.resnets.0.conv1.weight", "encoder.mid_block.resnets.0.conv1.weight")
_PREFIX_PREFERENCE = ("", "first_stage_model.", "vae.")
# Top-level names of the VAE's own modules in each layout; anything else (UNet, text encoders,
# `loss.*` discriminator weights, EMA copies) is not part of the VAE and is dropped.
_WAN_NAMESPACES = ("encoder.", "decoder.", "conv1.", "conv2.")
_LDM_NAMESPACES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")  # bn: Flux.2
# The constructor arguments that a refusal names, so the user sees what was read off the weights.
_SUMMARY_KEYS = (
    "base_dim", "z_dim", "dim_mult", "num_res_blocks", "block_out_channels", "layers_per_block",
    "latent_channels", "norm_num_groups", "use_quant_conv", "mid_block_add_attention",
)


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
    """Load a VAE from a diffusers folder, a single checkpoint file or a ``random:`` spec, offline, in eval mode.

    ``path`` may be a diffusers model folder (``config.json`` + weights), a pipeline folder with a
    ``vae/`` subfolder, or a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` file in the
    original Wan 2.1 layout or the ldm/sgm SD-family layout (also prefixed, or inside a full SD
    checkpoint). Pickle files are read with ``weights_only=True``, so they never run code.

    ``arch`` picks what the keys cannot tell apart: ``"qwen-image"`` for a Wan-layout file (default
    ``"wan2.1"``), ``"sdxl"`` for an SD-layout file (default ``"sd"``), ``"sd3"`` for a Flux-layout
    file (default ``"flux"``); it sets the class and the scaling/shift factors. For a folder the
    folder's ``config.json`` wins and ``arch`` only labels the model (it must fit the class).

    ``path`` may also be ``random:ARCH[:tiny][:seed=N]``, as on the command line: seeded random
    weights in the real architecture (see :func:`random_vae`).

    ``dtype=None`` gives float32 whatever the file stores; ``device=None`` keeps the model on CPU.
    """
    device_ = archs.parse_device(device)
    dtype_ = archs.parse_dtype(dtype)
    arch_ = archs.normalize_arch(arch)
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"load_vae: path must be a str or os.PathLike, got {type(path).__name__}")
    if isinstance(path, str) and archs.is_random_spec(path):
        return archs.random_from_spec(path, device_, dtype_, arch=arch_)
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise LoadError(f"{p}: no such file or directory")
    if p.is_dir():
        return _load_folder(p, arch_, device_, dtype_)
    if p.name.startswith("diffusion_pytorch_model") and (p.parent / "config.json").is_file():
        # A diffusers weights file given alone: its keys only make sense with the folder's config.
        return _load_folder(p.parent, arch_, device_, dtype_)
    state_dict = read_state_dict(p)
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
        state_dict, archs.normalize_arch(arch), "state dict", archs.parse_device(device), archs.parse_dtype(dtype)
    )


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Name the key layout of a VAE state dict: "wan2.1", "wan2.2", "ldm" or "ldm-noquant".

    "ldm" is the SD-family layout with ``quant_conv``/``post_quant_conv`` (SD 1.x/2.x, SDXL);
    "ldm-noquant" is the same without them (Flux, SD3). Wrappers (``state_dict``/``model``/``module``)
    and a ``first_stage_model.``/``vae.`` (or any other) prefix are looked through. Raises
    :class:`LoadError` when no known layout is found.
    """
    tensors = tensors_only(state_dict, "state dict")
    family, prefix = _locate(tensors, "state dict")
    return _classify(family, _extract(tensors, family, prefix))


def parse_vae_spec(
    spec: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    arch: str | None = None,
) -> nn.Module:
    """Resolve the command line's ``--vae`` value: ``random:ARCH[:tiny][:seed=N]`` or a path."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError("--vae: expected random:ARCH[:tiny][:seed=N] or a path, got an empty value")
    return load_vae(spec.strip(), device, dtype, arch=arch)


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
        return "wan2.2" if keymaps.is_wan22(vae_sd) else "wan2.1"
    if keymaps.is_flux2(vae_sd):
        return "flux2"
    if "quant_conv.weight" in vae_sd or "post_quant_conv.weight" in vae_sd:
        return "ldm"
    return "ldm-noquant"


# --------------------------------------------------------------------------------------------------
# building models
# --------------------------------------------------------------------------------------------------


def _build_from_state_dict(
    state_dict: Mapping[str, Any],
    arch: str | None,
    source: str,
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    tensors = tensors_only(state_dict, source)
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
        config = keymaps.wan21_config(vae_sd, arch, source)
        converted = convert_wan_vae_to_diffusers(vae_sd)
    elif layout == "wan2.2":
        config = keymaps.wan22_full_config(vae_sd, source)
        converted = keymaps.wan22_to_diffusers(vae_sd, source)
    elif layout == "flux2":
        ldm_sd, bn = keymaps.flux2_to_ldm(vae_sd)
        config = keymaps.ldm_config(ldm_sd, arch, source)
        config.update(keymaps.flux2_config(bn, config["latent_channels"], source))
        converted = {**convert_ldm_vae_checkpoint(ldm_sd, config), **bn}
    else:
        config = keymaps.ldm_config(vae_sd, arch, source)
        converted = convert_ldm_vae_checkpoint(vae_sd, config)
    converted = {k: v for k, v in converted.items() if isinstance(v, torch.Tensor)}
    unused = _unused_keys(vae_sd, converted)
    model = _instantiate(config, converted, unused, source, device, dtype)
    setattr(model, archs.ARCH_ATTR, arch)
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


def _misfit(
    missing: Iterable[str],
    unexpected: list[str],
    mismatched: Iterable[tuple[str, Sequence[int], Sequence[int]]],
    errors: Sequence[str] = (),
) -> str:
    """What keeps weights from filling a model exactly, in words; "" when they fit."""
    shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(mismatched)]
    groups = {"missing": sorted(missing), "unexpected": unexpected, "with other shapes (file vs model)": shapes}
    parts = [f"{len(keys)} {label}: {_few(keys)}" for label, keys in groups.items() if keys]
    if errors:
        parts.append(f"errors: {_few(list(errors), 2)}")
    return "; ".join(parts)


def _instantiate(
    config: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    unused: list[str],
    source: str,
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    cls = archs.class_for(config["_class_name"], source)
    kwargs = archs.constructor_kwargs(config)
    # Build without allocating or randomly initialising (1-2 s for the full Wan VAE), then copy
    # the weights straight onto the target device in the target dtype.
    with torch.device("meta"):
        model = cls(**kwargs)
    expected = model.state_dict()
    misfit = _misfit(
        set(expected) - set(weights),
        sorted(set(weights) - set(expected)) + [f"{k} (original key, not mapped)" for k in unused],
        [(k, w.shape, expected[k].shape) for k, w in weights.items() if k in expected and w.shape != expected[k].shape],
    )
    if misfit:
        summary = ", ".join(f"{k}={kwargs[k]}" for k in _SUMMARY_KEYS if k in kwargs)
        raise LoadError(f"{source}: weights do not fit the inferred {cls.__name__} ({summary}): {misfit}")
    if any(name not in expected for name, _ in model.named_buffers()):
        # A buffer the state dict does not restore would stay uninitialised: build for real.
        model = cls(**kwargs)
        archs.place(model, device, dtype or torch.float32)
    else:
        archs.place(model, None, dtype or torch.float32)
        model.to_empty(device=device or torch.device("cpu"))
    model.load_state_dict(weights, strict=True)
    model.eval()
    return model


@contextmanager
def _diffusers_quiet() -> Iterator[None]:
    """Hide diffusers' own log lines and progress bars while it loads for us (e.g. its advice to
    install ``accelerate``): they are not ours to print, and ``--quiet`` must mean quiet. Problems
    still reach the user, as our :class:`LoadError`."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    progress = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if progress:
            diffusers_logging.enable_progress_bar()


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
    cls = archs.class_for(cfg.get("_class_name"), str(cfg_path))
    if arch is not None:
        want = archs.arch_config(arch)["_class_name"]
        if want != cls.__name__:
            raise InvalidInputError(f"{folder}: arch={arch!r} needs {want} but config.json says {cls.__name__}")
    try:
        with _diffusers_quiet():
            model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as e:  # diffusers raises OSError/EnvironmentError/ValueError/RuntimeError
        why = headline(e) or type(e).__name__
        raise LoadError(f"{folder}: diffusers could not load this {cls.__name__} folder: {why}") from e
    misfit = _misfit(
        map(str, info.get("missing_keys") or []),
        sorted(str(k) for k in info.get("unexpected_keys") or []),
        info.get("mismatched_keys") or [],
        [str(e) for e in info.get("error_msgs") or []],
    )
    if misfit:
        raise LoadError(f"{folder}: weights do not fit config.json ({cls.__name__}): {misfit}")
    archs.place(model, device, dtype or torch.float32)
    model.eval()
    setattr(model, archs.ARCH_ATTR, arch or archs.guess_arch(model))
    return model
