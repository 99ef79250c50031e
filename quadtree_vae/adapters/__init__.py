"""One adapter per architecture family; each only describes the network for the engine."""

from __future__ import annotations

from types import ModuleType

from torch import nn

from ..errors import UnsupportedArchitectureError
from . import sd, wan

FAMILIES: tuple[ModuleType, ...] = (wan, sd)
SUPPORTED = (
    "AutoencoderKLWan (Wan 2.1), AutoencoderKLQwenImage (Qwen-Image), AutoencoderKL (SD 1.x/2.x, SDXL, SD3, Flux)"
)


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
