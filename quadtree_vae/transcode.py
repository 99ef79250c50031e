"""The command line's streaming from file to file: a video is read in chunks of frames into
:func:`quadtree_vae.encode_frames`, and :func:`quadtree_vae.decode_frames` is written to the output
video window by window, so only the latent tensor grows with the clip."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import api, latents, media, stream
from .console import TileBar
from .options import Options
from .planner import Plan


def encode_video(vae: torch.nn.Module, path: Path, fit: Callable[[np.ndarray], np.ndarray], chunk: int,
                 opts: Options, plan: Plan, length: int, bar: TileBar) -> tuple[torch.Tensor, int]:
    """Encode the video at ``path`` as it is read, ``chunk`` frames at a time, each fitted by ``fit``;
    returns the latents and the frames read (the container's count may be off)."""
    seen = 0

    def pixels() -> Iterator[torch.Tensor]:
        nonlocal seen
        for frames in media.video_chunks(path, chunk):
            seen += frames.shape[0]
            yield latents.to_clip(fit(frames))

    parts = list(stream.encode_frames(vae, pixels(), opts.tile, opts.budget, opts.mode, frames=opts.frames,
                                      length=length, output_device="cpu", progress=bar.part(0), plan=plan))
    return torch.cat(parts, dim=2), seen


def decoded(vae: torch.nn.Module, z: torch.Tensor, opts: Options, plan: Plan, temporal: bool,
            bar: TileBar) -> Iterator[np.ndarray]:
    """Decoded (t, H, W, 3) uint8 frames as they finish, item by item over the batch: a latent
    video window by window (``qv.decode_frames``), anything else one item at a time."""
    for k in range(z.shape[0]):
        if temporal and z.dim() == 5:
            for y in stream.decode_frames(vae, z[k:k + 1], opts.tile, opts.budget, opts.mode, output_device="cpu",
                                          progress=bar.part(k), plan=plan):
                yield latents.frames_of(y, temporal)
        else:
            item = replace(opts, progress=bar.part(k), plan=plan)
            yield latents.frames_of(api.run_tiled("decode", vae, z[k:k + 1], item), temporal)


def write_frames(dest: Path, frames: Iterator[np.ndarray], fps: Fraction | None,
                 force: bool) -> tuple[int, tuple[int, int]]:
    """Write chunks of frames to a video as they come (``fps`` given), or to an image; returns the
    frame count and size written."""
    if fps is None:
        image = np.concatenate(list(frames))
        media.write_media(dest, image, None, force=force)
        return image.shape[0], image.shape[1:3]
    written = 0
    with media.video_writer(dest, fps, force) as write:
        for chunk in frames:
            write(chunk)
            written, size = written + chunk.shape[0], chunk.shape[1:3]
    return written, size
