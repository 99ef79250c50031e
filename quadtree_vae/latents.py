"""Latent files as ``qvae`` writes them: the model input fitted from an image or video (with the
metadata that records the fitting), the checks before decoding one, and undoing the fitting after.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import __version__, media
from .console import RANDOM_NOTE, Console
from .errors import InvalidInputError
from .fitting import fit_pixels, fitted_size, frame_note, frames_to_add

VERSION = "1"


@dataclass
class Fitting:
    """How an input's pixels become the model input: its metadata, the notes that say so, and what
    to do to each frame (``size``/``offset`` as :func:`~quadtree_vae.fitting.fitted_size` gives) and
    to the frame count (``added`` frames: > 0 padded, < 0 trimmed)."""

    size: tuple[int, int]
    offset: tuple[int, int]
    crop: bool
    added: int
    meta: dict
    notes: list[str]

    def pixels(self, frames: np.ndarray) -> np.ndarray:
        """(t, H, W, 3) frames cropped or padded to the model's size; chunk by chunk works as well."""
        return fit_pixels(frames, self.size, self.offset)

    def shown(self, frames: np.ndarray) -> np.ndarray:
        """The frames a decode should reproduce: cropped as encoded, but without padding."""
        return fit_pixels(frames, self.size, self.offset) if self.crop else frames


def input_fitting(h: int, w: int, t: int, fps: Fraction | None, is_video: bool, args, info: dict,
                  what: str) -> Fitting:
    """The fitting of a ``t``-frame ``h`` x ``w`` input (refused as ``--fit`` / ``--frames`` say)."""
    facts = info["facts"]
    size, offset, notes = fitted_size(h, w, facts.spatial_factor, args.fit, what)
    meta: dict = {"kind": "video" if is_video else "image", "source_size": [h, w]}
    crop = size != (h, w) and args.fit == "crop"
    if size != (h, w):
        meta["fit"] = args.fit
        if crop:
            meta["crop_offset"] = list(offset)
    meta["image_size"] = list(size)
    meta["frames"] = t
    if fps is not None:
        meta["fps"] = str(fps)
    added = 0
    if facts.temporal:
        added = frames_to_add(facts, t, args.frames, what, "--frames {}")
        if added:
            notes.append(frame_note(t, added))
        if added < 0:
            meta["frames_trimmed"] = -added
        elif added > 0:
            meta["frames_padded"] = added
    else:
        if is_video:
            notes.append(f"{info['class']} is a 2-D (image) VAE: encoding the {t} frames one by one as a batch "
                         f"of images (no temporal compression)")
            meta["frames_as_batch"] = True
        if args.frames not in (None, "error"):
            notes.append(f"--frames {args.frames} does not apply to a 2-D VAE (any frame count works)")
    meta["frames_encoded"] = t + added
    return Fitting(size, offset, crop, added, meta, notes)


def model_input(src: media.Media, args, info: dict, what: str, out: Console):
    """Fit the pixels for the model: returns (x, meta, shown) where ``x`` is the model input
    (B, 3, [T,] H, W) in [-1, 1] on CPU, ``meta`` the latent metadata about the input and ``shown``
    the (T, H, W, 3) uint8 frames a decode of ``x`` should reproduce (after fit/trim, without padding).
    16-bit pixels go into ``x`` with all their bits; ``shown`` is rounded to 8 bits, as decode writes."""
    t, h, w = src.frames.shape[:3]
    fit = input_fitting(h, w, t, src.fps, src.is_video, args, info, what)
    frames, shown = fit.pixels(src.frames), fit.shown(src.frames)
    if fit.added < 0:
        frames, shown = frames[:fit.added], shown[:fit.added]
    elif fit.added > 0:
        frames = np.concatenate([frames, np.repeat(frames[-1:], fit.added, axis=0)])
    # a video VAE takes one (1, 3, T, H, W) clip, an image VAE the frames as a batch (T, 3, H, W)
    x = to_clip(frames) if info["facts"].temporal else media.to_tensor(frames)
    for n_ in fit.notes:
        out.note(n_)
    return x, fit.meta, media.to_8bit(shown)


def to_clip(frames: np.ndarray) -> torch.Tensor:
    """(t, H, W, 3) pixels -> a (1, 3, t, H, W) model input chunk in [-1, 1]."""
    return media.to_tensor(frames).permute(1, 0, 2, 3).unsqueeze(0)


def tensor_input(x: torch.Tensor, info: dict, name: str) -> dict:
    """Check a pixel tensor (``qvae encode PIXELS.safetensors``) against the model and return the
    latent metadata about it. It is encoded as it is: the shape must already be one the model takes
    (no --fit, no --frames), so the latent is exactly the model's."""
    facts = info["facts"]
    want = "(B, C, T, H, W)" if facts.temporal else "(B, C, H, W)"
    if x.dim() != (5 if facts.temporal else 4) or x.shape[1] != facts.in_channels:
        raise InvalidInputError(f"{name}: pixels {tuple(x.shape)}; {info['class']} takes {want} with "
                                f"C = {facts.in_channels}")
    h, w = x.shape[-2:]
    if h % facts.spatial_factor or w % facts.spatial_factor:
        raise InvalidInputError(f"{name}: {h}x{w} pixels are not multiples of {facts.spatial_factor}; a pixel "
                                f"tensor is encoded as it is (crop or pad it, or pass an image file with --fit)")
    t = x.shape[2] if facts.temporal else 1
    if facts.extra_frames(t) or (facts.max_frames and t > facts.max_frames):
        rule = f"at most {facts.max_frames}" if facts.max_frames else f"1 + {facts.temporal_factor}k"
        raise InvalidInputError(f"{name}: {t} frames; {info['class']} takes {rule} frames and a pixel tensor is "
                                f"encoded as it is")
    kind = "video" if facts.temporal and t > 1 else "image"
    return {"kind": kind, "source_size": [h, w], "image_size": [h, w], "frames": t, "frames_encoded": t,
            "pixels": "tensor"}


def metadata(info: dict, z: torch.Tensor, args, source: Path) -> dict:
    return {
        "version": VERSION,
        "quadtree_vae_version": __version__,
        "architecture": info["arch"],
        "vae_class": info["class"],
        "vae": info["spec"],
        "fingerprint": info["fingerprint"],
        "vae_dtype": info["dtype"],
        "random_weights": bool(info["random"]),
        "note": RANDOM_NOTE if info["random"] else None,
        "shape": list(z.shape),
        "dtype": str(z.dtype).removeprefix("torch."),
        "latent_channels": int(z.shape[1]),
        "scaled": False,
        "mode": args.mode,
        "source": source.name,
    }


def frames_of(y: torch.Tensor, temporal: bool) -> np.ndarray:
    """Model output (B, 3, [T,] H, W) -> (B*T, H, W, 3) uint8."""
    if temporal and y.dim() == 5:
        b, c, t, h, w = y.shape
        y = y.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    return media.from_tensor(y)


def restore(frames: np.ndarray, meta: dict, out: Console) -> np.ndarray:
    """Undo what encode added: padded frames and padded borders (as the metadata records)."""
    return np.concatenate(list(restored([frames], meta, frames.shape[0], out)))


def restored(chunks: Iterable[np.ndarray], meta: dict, count: int, out: Console) -> Iterator[np.ndarray]:
    """:func:`restore` for decoded frames that arrive in chunks, ``count`` frames in all: the
    padding frames are the last ones, so each chunk is passed on as soon as it comes."""
    padded = int(media.meta_value(meta, "frames_padded", 0) or 0)
    keep = count - padded if padded and count > padded else count
    seen, size = 0, None
    for frames in chunks:
        first, seen = seen, seen + frames.shape[0]
        frames = frames[: max(0, keep - first)]
        size = _unpadded(meta, *frames.shape[1:3])
        if size is not None:
            frames = frames[:, : size[0], : size[1]]
        if frames.shape[0]:
            yield frames
    if keep < count:
        out.note(f"dropped the {padded} padding frame(s) added by --frames pad ({keep} frames)")
    if size is not None:
        out.note(f"cropped the --fit pad border off: {size[0]}x{size[1]}")


def _unpadded(meta: dict, h: int, w: int) -> tuple[int, int] | None:
    """The source size to crop ``h`` x ``w`` frames back to when encode padded them (--fit pad)."""
    size = media.meta_value(meta, "source_size")
    if media.meta_value(meta, "fit") != "pad" or not (isinstance(size, list) and len(size) == 2):
        return None
    return (size[0], size[1]) if size[0] <= h and size[1] <= w else None


def check_decodable(z: torch.Tensor, meta: dict, info: dict, src: Path, dest: Path, out: Console) -> int:
    """Refuse latents the VAE cannot decode; warn about a different model; returns the frame count
    the output will have (after dropping padding frames)."""
    made_by = media.meta_value(meta, "architecture")
    by = f" (made by {made_by}, {media.meta_value(meta, 'vae_class')})" if made_by else ""
    if z.dim() < 2 or z.shape[1] != info["latent_channels"]:
        got = z.shape[1] if z.dim() >= 2 else "no"
        raise InvalidInputError(
            f"{src.name} holds latents with {got} channels{by}, shape {tuple(z.shape)}; the VAE {info['spec']} "
            f"({info['class']}, {info['arch']}) takes {info['latent_channels']}. Pass the VAE that encoded them "
            f"with --vae"
        )
    temporal = info["facts"].temporal
    if z.dim() == 5 and not temporal:
        raise InvalidInputError(
            f"{src.name} holds 5-D video latents {tuple(z.shape)}{by}; the VAE {info['spec']} ({info['class']}) is a "
            f"2-D image VAE. Pass the VAE that encoded them with --vae"
        )
    if z.dim() not in (4, 5):
        raise InvalidInputError(f"{src.name}: expected a latent of shape (B, C, h, w) or (B, C, T, h, w), "
                                f"got {tuple(z.shape)}")
    fp = media.meta_value(meta, "fingerprint")
    made_in = media.meta_value(meta, "vae_dtype")
    if fp and str(fp) != info["fingerprint"] and made_in and made_in != info["dtype"]:
        out.warn(f"{src.name} was made by a VAE in {made_in} (fingerprint {fp}); decoding in {info['dtype']} "
                 f"(fingerprint {info['fingerprint']}): the fingerprint depends on the dtype, so it cannot tell "
                 f"whether these are the same weights")
    elif fp and str(fp) != info["fingerprint"]:
        out.warn(f"{src.name} was made by a VAE with fingerprint {fp}{by}; decoding with {info['fingerprint']} "
                 f"({info['spec']}): the output will not match the encoded input")
    elif made_by and made_by != info["arch"]:
        out.warn(f"{src.name} was made by {made_by}; decoding with {info['arch']}")
    if media.meta_value(meta, "random_weights") is True and not info["random"]:
        out.warn(f"{src.name} was encoded with random weights: it does not hold a real image")
    count = z.shape[0] * (info["facts"].image_frames(z.shape[2]) if z.dim() == 5 else 1)
    padded = int(media.meta_value(meta, "frames_padded", 0) or 0)
    if padded and count > padded:
        count -= padded
    if count > 1 and dest.suffix.lower() in media.IMAGE_WRITE:
        raise InvalidInputError(
            f"{src.name} decodes to {count} frames, which do not fit in {dest.suffix}; write a video "
            f"({', '.join(media.VIDEO_WRITE)})"
        )
    media.check_frame_size(dest, *output_size(z, meta, info["facts"].spatial_factor))
    return count


def output_size(z: torch.Tensor, meta: dict, factor: int) -> tuple[int, int]:
    """(height, width) of the frames a decode of ``z`` writes: the model's, less a --fit pad border."""
    h, w = z.shape[-2] * factor, z.shape[-1] * factor
    return _unpadded(meta, h, w) or (h, w)
