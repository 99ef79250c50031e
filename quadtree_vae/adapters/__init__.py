"""One adapter per architecture family; each only describes the network for the engine."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from . import sd, wan
from .common import Facts

FAMILIES: tuple[ModuleType, ...] = (wan, sd)
SUPPORTED = ", ".join(family.CLASSES for family in FAMILIES)
#: The diffusers class names the adapters tile (each adapter lists its classes in ``MODELS``).
CLASS_NAMES = tuple(cls.__name__ for family in FAMILIES for cls in family.MODELS)


def adapter_for(vae: object) -> ModuleType:
    """The adapter module for ``vae``, or :class:`UnsupportedArchitectureError` naming what is missing."""
    if not isinstance(vae, nn.Module):
        raise UnsupportedArchitectureError(
            f"{type(vae).__name__} is not a torch module; expected a diffusers VAE: {SUPPORTED}"
        )
    for family in FAMILIES:
        if family.supports(vae):
            family.check(vae)
            return family
    found = [n for n in ("encoder", "decoder", "quant_conv", "post_quant_conv") if hasattr(vae, n)]
    raise UnsupportedArchitectureError(
        f"{type(vae).__name__} is not a supported VAE class (it has {', '.join(found) or 'no encoder/decoder'}; "
        f"missing: an adapter for this class). Supported: {SUPPORTED}. Pass fallback='full' to run it untiled."
    )


def facts(vae: object) -> Facts:
    """Spatial and temporal factors, frame rule and channels of ``vae``, as its adapter states them."""
    family = adapter_for(vae)
    return family.facts(vae)


def pack_latent(vae: object, z: torch.Tensor) -> torch.Tensor:
    """``z`` as the family's pipelines hand latents around (Flux.2: 2x2-folded and batch-normalised);
    unchanged for families without such a step (see :attr:`Facts.latent_patch`)."""
    pack = getattr(adapter_for(vae), "pack_latent", None)
    return pack(vae, z) if pack is not None else z


def unpack_latent(vae: object, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_latent`: what the model's ``decode`` takes."""
    unpack = getattr(adapter_for(vae), "unpack_latent", None)
    return unpack(vae, z) if unpack is not None else z
