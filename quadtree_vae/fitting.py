"""Fitting an input to what the model takes: sides that are multiples of its spatial factor, and
(video models) the frame count its encoder takes whole. Shared by the API, the CLI and ComfyUI.

The model's numbers come from its adapter (:class:`~quadtree_vae.adapters.common.Facts`); here
is only what to do when an input does not fit: refuse, crop/trim, or pad by repeating the edge or
the last frame. ``flag`` spells the option for the caller's messages (``frames='{}'`` in Python,
``--frames {}`` on the command line).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .adapters.common import Facts
from .errors import InvalidInputError

FITS = ("crop", "pad")


def fitted_size(
    h: int, w: int, factor: int, fit: str | None, what: str, flag: str = "--fit {}"
) -> tuple[tuple[int, int], tuple[int, int], list[str]]:
    """((height, width) to encode, (top, left) crop offset, notes) for ``fit``; refuses without one.

    crop: centre crop to the multiple of ``factor`` below (as ComfyUI's ``vae_encode_crop_pixels``);
    pad: repeat the last row/column up to the multiple above (decode crops it off again)."""
    if h % factor == 0 and w % factor == 0:
        return (h, w), (0, 0), []
    down = (h // factor * factor, w // factor * factor)
    up = (math.ceil(h / factor) * factor, math.ceil(w / factor) * factor)
    if fit is None:
        crop = f"{flag.format('crop')} (centre-crop to {down[0]}x{down[1]})" if min(down) > 0 else None
        pad = f"{flag.format('pad')} (pad to {up[0]}x{up[1]}; decode crops back to {h}x{w})"
        raise InvalidInputError(
            f"{what} is {h}x{w} (HxW): height and width must be multiples of {factor}. Pass "
            + (f"{crop} or {pad}" if crop else pad)
        )
    if fit == "crop":
        if min(down) == 0:
            raise InvalidInputError(
                f"{what} is {h}x{w}: too small to crop to a multiple of {factor}; use {flag.format('pad')}"
            )
        top, left = (h - down[0]) // 2, (w - down[1]) // 2
        return down, (top, left), [f"{flag.format('crop')}: {h}x{w} centre-cropped to {down[0]}x{down[1]}"]
    return up, (0, 0), [f"{flag.format('pad')}: {h}x{w} padded to {up[0]}x{up[1]} (edge repeated); "
                        f"decode crops it back"]


def fit_pixels(frames: np.ndarray, size: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """(T, H, W, C) frames cropped at ``offset`` or edge-padded to ``size`` (from :func:`fitted_size`)."""
    (eh, ew), (top, left) = size, offset
    h, w = frames.shape[1:3]
    if (eh, ew) == (h, w):
        return frames
    if eh <= h and ew <= w:
        return frames[:, top:top + eh, left:left + ew]
    return np.pad(frames, ((0, 0), (0, eh - h), (0, ew - w), (0, 0)), mode="edge")


def frames_to_add(facts: Facts, t: int, policy: str | None, what: str, flag: str = "frames='{}'") -> int:
    """Frames to append (pad, > 0) or drop (trim, < 0) so the encoder takes all ``t`` frames;
    refuses (``policy`` None or "error") when the model would otherwise drop some silently."""
    extra = facts.extra_frames(t)
    if not extra:
        return 0
    missing = facts.temporal_factor - extra
    if policy == "trim":
        return -extra
    if policy == "pad":
        return missing
    raise InvalidInputError(
        f"{what}: {t} frames is not 1 + {facts.temporal_factor}k; the model would silently drop the last {extra}. "
        f"Pass {flag.format('trim')} to drop them ({t - extra} frames) or {flag.format('pad')} to repeat the last "
        f"frame {missing} more time(s) ({t + missing} frames)"
    )


def frame_note(t: int, added: int, flag: str = "--frames {}") -> str:
    """What :func:`frames_to_add` did, for the user."""
    if added < 0:
        return f"{flag.format('trim')}: dropped the last {-added} of {t} frames (encoding {t + added})"
    return (f"{flag.format('pad')}: repeated the last frame {added} time(s) ({t} -> {t + added} frames); "
            f"decode drops them again")


def fit_frames(x: torch.Tensor, added: int) -> torch.Tensor:
    """A (B, C, T, H, W) clip with ``added`` copies of its last frame (or ``-added`` frames dropped)."""
    if added < 0:
        return x[:, :, :added]
    if added > 0:
        return torch.cat([x, x[:, :, -1:].expand(-1, -1, added, -1, -1)], dim=2)
    return x
