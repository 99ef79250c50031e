"""What every adapter needs: footprints and work read off the modules' own convs and pads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedArchitectureError
from ..geometry import POINTWISE, Conv, Footprint, Up


@dataclass(frozen=True)
class Facts:
    """What a front end may ask about a model. Its adapter is the one place that states these."""

    name: str  # the model's class name, for messages
    spatial_factor: int  # image pixels per latent pixel along each side
    temporal_factor: int | None  # videos take 1 + temporal_factor * k frames; None: images only (4-D)
    in_channels: int  # channels of the image the user passes (before any patchify)
    latent_channels: int
    patch_size: int = 1  # pixels per side the model folds into channels before its encoder (Wan 2.2: 2)
    max_frames: int | None = None  # the most frames a clip may have (Qwen-Image 2.1: 1); None: no limit
    # latent pixels per side its pipelines fold into channels after the VAE (Flux.2: 2, with a batch norm;
    # see the adapter's pack_latent); 1: none. Front ends that hand such packed latents around (ComfyUI)
    # crop images to spatial_factor * latent_patch.
    latent_patch: int = 1
    fps: int = 16  # the frame rate its videos are made at, for a video or latent that states none
    clip_frames: int = 81  # frames of a typical clip, to plan a stream whose length is not known yet

    @property
    def temporal(self) -> bool:
        return self.temporal_factor is not None

    def extra_frames(self, t: int) -> int:
        """Frames past the last ``1 + k * temporal_factor`` (the model would drop them); 0 for images."""
        return (t - 1) % self.temporal_factor if self.temporal else 0

    def latent_frames(self, t: int) -> int:
        """Latent frames of a clip of ``t`` frames."""
        return 1 + (t - 1) // self.temporal_factor if self.temporal else t

    def image_frames(self, t_latent: int) -> int:
        """Frames a clip of ``t_latent`` latent frames decodes to."""
        return 1 + (t_latent - 1) * self.temporal_factor if self.temporal else t_latent


def unsupported(model: nn.Module, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"{type(model).__name__}: {what}")


def _spatial_pad(conv: nn.modules.conv._ConvNd) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding the conv applies itself, causal convs included."""
    causal = getattr(conv, "_padding", None)  # Wan/Qwen causal convs pad in forward, not in the conv
    if causal is not None:
        return tuple(causal[:4])
    if isinstance(conv.padding, str):
        raise UnsupportedArchitectureError(f"{type(conv).__name__} with padding={conv.padding!r}")
    ph, pw = conv.padding[-2], conv.padding[-1]
    return pw, pw, ph, ph


def conv_footprint(conv: nn.Module, extra_pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Footprint:
    """Footprint of a 2-D/3-D conv over its two spatial axes, plus any explicit pad in front of it."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise UnsupportedArchitectureError(f"expected a convolution, found {type(conv).__name__}")
    kh, kw = conv.kernel_size[-2:]
    sh, sw = conv.stride[-2:]
    if conv.dilation[-2:] != (1, 1) or conv.padding_mode != "zeros":
        raise UnsupportedArchitectureError(f"{type(conv).__name__} with dilation or non-zero padding mode")
    left, right, top, bottom = (a + b for a, b in zip(_spatial_pad(conv), extra_pad))
    if (kh, sh, top, bottom) != (kw, sw, left, right):
        raise UnsupportedArchitectureError(f"{type(conv).__name__} is not the same along height and width")
    fp = Conv(kw, sw, (left, right))
    return POINTWISE if fp == POINTWISE else fp


def upsample_footprint(up: nn.Module) -> Footprint:
    """Nearest-neighbour upsampling by an integer factor (nn.Upsample or a scale factor attribute)."""
    mode = getattr(up, "mode", "nearest")
    scale = getattr(up, "scale_factor", 2)
    scales = scale if isinstance(scale, tuple) else (scale, scale)
    if mode not in ("nearest", "nearest-exact") or len(set(scales)) != 1 or scales[0] != int(scales[0]):
        raise UnsupportedArchitectureError(f"upsampling mode={mode!r} scale={scale!r}")
    return Up(int(scales[0]))


def conv_work(module: nn.Module) -> float:
    """Multiply-adds per output position of all convs inside ``module`` (planner estimate)."""
    total = 0.0
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            total += math.prod(m.kernel_size) * m.in_channels * m.out_channels / m.groups
    return total

