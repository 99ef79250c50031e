"""Streaming encode and decode for the video VAEs (Wan 2.1, Qwen-Image): frames in, frames out.

>>> for frames in qv.decode_frames(vae, z, tile=512):   # (B, 3, t, H, W) as each window finishes
...     writer.write(frames)
>>> for latent in qv.encode_frames(vae, reader, tile=512):  # any iterable of pixel chunks
...     parts.append(latent)                                 # (B, C, t, h, w) latent frames

Both run the same windowed execution as :func:`quadtree_vae.encode` / :func:`quadtree_vae.decode`
(which collect it into one tensor), so what they yield, put together, equals the untiled model.
Memory does not grow with the clip: each window runs through the whole network before the next
starts, and the causal caches carry over (see :mod:`quadtree_vae.engine`).

The frame rule (the encoder takes 1 + 4k frames) applies to a stream too, but its length is only
known at its end. So the frames of a stream are encoded as soon as a whole time chunk of the
model has arrived (1 frame, then 4 at a time), and the rule is applied to the frames left over
when the stream ends: ``frames="error"`` raises :class:`InvalidInputError` then, after the latent
frames of every whole chunk have been yielded; ``"trim"`` drops the left-over frames; ``"pad"``
repeats the last frame to complete the chunk. Each gives the same latents as ``qv.encode`` of the
whole clip with the same ``frames`` option.

A tile that runs out of memory in the first time window is split, as in ``qv.decode``; after it,
the tile's causal caches carry over from earlier windows and a stream cannot go back over frames it
has yielded, so :class:`~quadtree_vae.errors.OutOfMemoryError` is raised (``qv.decode`` starts again).

While a stream is open the model runs in float32 if its config asks for ``force_upcast`` (as
``qv.encode`` does for the length of one call); it goes back to its own dtype when the stream ends
or is closed. Gradients are off only while the stream computes, never between yields.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

from . import adapters, distributed
from .adapters.common import Facts
from .api import _check_shape, _check_tensor, _device, _network, _plan, _run_of, _ticker, _upcast
from .engine import Frames, Network, bounds_of, stream
from .errors import InvalidInputError, NonFiniteOutputError
from .options import Options, Progress
from .planner import Plan

T = TypeVar("T")


def decode_frames(
    vae: nn.Module,
    z: torch.Tensor,
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    *,
    window: int | None = None,
    output_device: torch.device | str | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    group: object = None,
) -> Iterator[torch.Tensor]:
    """Decode the latent video ``z`` (B, C, T, h, w), yielding frames (B, 3, t, H, W) as they finish.

    Options as in :func:`quadtree_vae.decode`; ``window`` sets the latent frames per window (the
    plan's otherwise). Together the yielded chunks equal ``vae.decode(z).sample``. Checks run when
    the first chunk is asked for. With ``group=`` every rank of the group iterates the stream (the
    windows are computed together); a rank that is not ``Ranks.dst`` yields nothing.
    """
    family, facts = _video_family(vae, "decode_frames")
    name = facts.name
    opts = Options(tile, budget, mode, output_device=output_device, progress=progress, plan=plan, group=group)
    shape = _check_tensor(facts, "decode", z)
    if len(shape) != z.dim():
        raise InvalidInputError(
            f"{name} decode_frames: expected a latent video (B, C, T, h, w), got shape {tuple(z.shape)}")
    net = _network(family, vae, "decode", opts.mode)
    out_device = opts.output_device if opts.output_device is not None else z.device
    with _upcast(vae) as dtype:
        plan = _stream_plan(vae, net, facts, "decode", shape, opts, dtype, window)
        tick = _ticker(plan, net, shape[2], opts.progress, opts.group)
        run = _run_of(plan, _device(vae), out_device, tick, opts.group)
        chunks = Frames(z.to(dtype), bounds_of(net.chunks(shape[2])), owned=False)
        yield from _checked(_no_grad(stream(net, plan.segments, chunks, run)), name, "decode", dtype)


def encode_frames(
    vae: nn.Module,
    chunks: Iterable[torch.Tensor],
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    *,
    frames: str = "error",
    window: int | None = None,
    length: int | None = None,
    output_device: torch.device | str | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    group: object = None,
) -> Iterator[torch.Tensor]:
    """Encode a stream of pixel chunks, yielding latent frames (B, C, t, h, w) as they finish.

    ``chunks`` is any iterable of (B, 3, t, H, W) tensors (or (B, 3, H, W) single frames) in
    [-1, 1], of any lengths t, with the same batch, channels and size; nothing is read ahead of
    what the model needs. Together the yielded latents equal ``vae.encode(x).latent_dist.mode()``
    of the concatenated clip. ``frames`` says what happens when the stream does not end on 1 + 4k
    frames (see the module docstring). ``length``, the expected frame count, only sizes the plan
    (default: the family's typical clip, ``Facts.clip_frames``: 81 frames for Wan 2.1) and the
    ``progress`` total; ``window`` and ``group`` as in
    :func:`decode_frames`; other options as in :func:`quadtree_vae.encode`. Under ``group=`` every
    rank passes the same chunks.
    """
    family, facts = _video_family(vae, "encode_frames")
    name = facts.name
    opts = Options(tile, budget, mode, frames, output_device=output_device, progress=progress, plan=plan,
                   group=group)
    net = _network(family, vae, "encode", opts.mode)
    source = iter(chunks)
    first = next(source, None)
    if first is None:
        raise InvalidInputError(f"{name} encode_frames: the stream has no frames")
    first = _as_video(facts, first)
    t_plan = length if length is not None else facts.clip_frames
    if isinstance(t_plan, bool) or not isinstance(t_plan, int) or t_plan < 1:
        raise InvalidInputError(f"length must be a positive number of frames, not {length!r}")
    shape = _check_shape(facts, "encode", (*first.shape[:2], t_plan, *first.shape[3:]))
    out_device = opts.output_device if opts.output_device is not None else first.device
    with _upcast(vae) as dtype:
        plan = _stream_plan(vae, net, facts, "encode", shape, opts, dtype, window, same_length=False)
        run = _run_of(plan, _device(vae), out_device, _ticker(plan, net, t_plan, opts.progress, opts.group),
                      opts.group)
        pixels = _model_chunks(net, _frames_of(facts, first, source), frames, facts)
        timed = (c.to(dtype) for c in pixels)
        yield from _checked(_no_grad(stream(net, plan.segments, timed, run)), name, "encode", dtype)


# ----------------------------------------------------------------------------------------- helpers


def _video_family(vae: nn.Module, what: str):
    """The adapter and facts of a video VAE; image VAEs have no time to stream."""
    family = adapters.adapter_for(vae)
    facts = family.facts(vae)
    if not facts.temporal:
        raise InvalidInputError(f"{what} needs a video VAE ({adapters.SUPPORTED}), not {facts.name}")
    return family, facts


def _as_video(facts: Facts, x: object) -> torch.Tensor:
    """A pixel chunk as (B, C, t, H, W): checked as ``qv.encode`` checks a clip, a single (B, C, H, W)
    frame given its time axis."""
    shape = _check_tensor(facts, "encode", x)
    return x.unsqueeze(2) if len(shape) != x.dim() else x


def _frames_of(facts: Facts, first: torch.Tensor, rest: Iterator) -> Iterator[torch.Tensor]:
    """The stream's chunks, each checked against the first as it arrives."""
    name = facts.name
    yield first
    for x in rest:
        x = _as_video(facts, x)
        if x.shape[:2] != first.shape[:2] or x.shape[3:] != first.shape[3:]:
            raise InvalidInputError(
                f"{name} encode_frames: a chunk of shape {tuple(x.shape)} does not match the stream's "
                f"batch, channels and size {tuple(first.shape[:2])} x {tuple(first.shape[3:])}"
            )
        yield x


def _model_chunks(net: Network, pixels: Iterator[torch.Tensor], frames: str, facts: Facts) -> Iterator[torch.Tensor]:
    """Regroup a stream of chunks of any lengths into the model's time chunks (1 frame, then 4).

    A chunk is passed on as soon as all its frames have arrived; the frames left over at the end
    follow the ``frames`` rule.
    """
    held: list[torch.Tensor] = []  # frames received but not passed on, as pieces of chunks
    seen, sent = 0, 0
    for x in pixels:
        held.append(x)
        seen += x.shape[2]
        lengths = net.chunks(seen)
        while len(lengths) > sent and sum(lengths[: sent + 1]) <= seen:
            piece, held = _take(held, lengths[sent])
            sent += 1
            yield piece
    extra = seen - sum(net.chunks(seen))
    if extra == 0:
        return
    if frames == "trim":
        return
    missing = next(p for p in range(1, seen + 2) if sum(net.chunks(seen + p)) == seen + p)
    if frames == "pad":
        last = held[-1][:, :, -1:]
        yield torch.cat([*held, last.expand(-1, -1, missing, -1, -1)], dim=2)
        return
    raise InvalidInputError(
        f"{facts.name} encode_frames: the stream ended after {seen} frames, which is not 1 + {facts.temporal_factor}k; "
        f"the latents of the "
        f"first {seen - extra} frames were yielded and the last {extra} were not encoded. Pass frames='trim' "
        f"to drop them or frames='pad' to repeat the last frame {missing} more time(s)."
    )


def _take(pieces: list[torch.Tensor], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first ``n`` frames of ``pieces`` as one tensor, and the pieces left."""
    out, left, got = [], list(pieces), 0
    while got < n:
        x = left.pop(0)
        need = n - got
        if x.shape[2] > need:
            out.append(x[:, :, :need])
            left.insert(0, x[:, :, need:])
            got = n
        else:
            out.append(x)
            got += x.shape[2]
    return (out[0] if len(out) == 1 else torch.cat(out, dim=2)), left


def _stream_plan(vae, net: Network, facts: Facts, op: str, shape, opts: Options, dtype, window: int | None,
                 same_length: bool = True) -> Plan:
    plan, mode = opts.plan, opts.mode
    if plan is None:
        plan = _plan(net, facts, op, shape, opts, _device(vae), dtype)
    else:
        # a stream's plan may be made for another length: only its batch, channels and size must match
        fits = plan.in_shape == tuple(shape) if same_length else (
            plan.in_shape[:2] + plan.in_shape[3:] == tuple(shape[:2]) + tuple(shape[3:]))
        if plan.op != op or not fits or plan.mode != mode:
            raise InvalidInputError(
                f"the plan was made for {plan.op} of {plan.in_shape} in {plan.mode} mode, "
                f"not {op} of {tuple(shape)} in {mode} mode"
            )
    plan = plan.with_window(window) if window is not None else plan
    return distributed.agree(plan, opts.group) if opts.group is not None else plan


def _no_grad(items: Iterator[T]) -> Iterator[T]:
    """Compute each item without gradients, leaving the caller's grad mode alone between items."""
    end = object()
    while True:
        with torch.no_grad():
            item = next(items, end)
        if item is end:
            return
        yield item


def _checked(pieces: Iterator[torch.Tensor], name: str, op: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for y in pieces:
        if y is None:  # tile-parallel: this window went to another rank (Ranks.dst)
            continue
        if not bool(torch.isfinite(y).all()):
            raise NonFiniteOutputError(
                f"{name} {op} produced NaN/Inf values in {dtype}: the VAE overflowed. Run it in float32 or "
                "bfloat16, or use an fp16-safe VAE."
            )
        yield y
