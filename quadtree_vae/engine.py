"""The engine: executes any network description tile by tile, segment by segment.

An adapter describes a network as a list of :class:`Step` s (the model's own blocks, each with its
footprint). A plan cuts that list into segments and gives each local segment a tile layout. For
every tile the engine walks the segment's footprints backwards to get the region each block must
see, then streams the time chunks through the blocks in order, cropping after each block, with a
causal cache of the tile's own; the tile's core is written into the segment's output. Segments
that need the whole frame (attention) run untiled on the materialised tensor between segments.
GroupNorm statistics are accumulated from the cores the previous segment writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from . import distributed
from .geometry import POINTWISE, Footprint, Region, halo_regions, produced, sizes_along
from .norm import Moments, merge_all


@dataclass
class Ctx:
    """What a step sees besides its input tile."""

    cache: list = field(default_factory=list)  # this tile's causal-cache slots for this step
    first: bool = True  # first time chunk of the stream
    stats: Moments | None = None  # whole-frame statistics of the step's input (GroupNorm)


@dataclass(eq=False)
class Step:
    """One block of the network as the engine runs it.

    ``fn(x, ctx)`` runs the model's own module(s) on a tile; ``footprint`` says how it maps
    regions; ``is_global`` steps need the whole frame (attention); a step with ``norm`` normalises
    its input with whole-frame statistics; ``skip`` names an earlier step whose *input* is joined
    to this step's result by ``join(result, skip_input)`` (a residual that spans a GroupNorm); the
    join runs after cropping, so it reads the skip input only where this step's output is kept.
    """

    name: str
    fn: Callable[[torch.Tensor, Ctx], torch.Tensor]
    channels: tuple[int, int]
    footprint: Footprint = POINTWISE
    is_global: bool = False
    norm: nn.GroupNorm | None = None
    skip: int | None = None
    join: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    cache_slots: int = 0
    time_scale: Fraction = Fraction(1)  # frames out per frame in, for chunks after the first
    work: float = 0.0  # multiply-adds per output pixel and frame, for the planner
    temporaries: float = 2.0  # extra full-size activations alive inside the step, for the planner


@dataclass(eq=False)
class Network:
    """A whole encoder or decoder: steps, and how the model streams time."""

    name: str
    steps: list[Step]
    in_channels: int
    chunks: Callable[[int], list[int]] | None = None  # None: 4-D images, no time axis

    @property
    def temporal(self) -> bool:
        return self.chunks is not None

    @property
    def spatial_factor(self) -> int:
        """Ratio between the image and latent sides, from the footprints (8 for all supported VAEs)."""
        sizes = sizes_along([s.footprint for s in self.steps], (4096, 4096))
        return max(h for h, _ in sizes) // min(h for h, _ in sizes)


@dataclass
class Frames:
    """A materialised tensor between segments, with the time chunks it streams in."""

    tensor: torch.Tensor
    bounds: list[tuple[int, int]] | None  # None for 4-D tensors
    owned: bool = True  # made by the engine, so it may be overwritten once no step needs it

    @property
    def size(self) -> tuple[int, int]:
        return self.tensor.shape[-2], self.tensor.shape[-1]

    def chunks(self) -> Sequence[tuple[int, int] | None]:
        return self.bounds if self.bounds is not None else [None]

    def read(self, chunk: tuple[int, int] | None, region: Region | None = None) -> torch.Tensor:
        x = self.tensor if chunk is None else self.tensor[:, :, chunk[0] : chunk[1]]
        return x if region is None else x[..., region.y[0] : region.y[1], region.x[0] : region.x[1]]


def bounds_of(lengths: Sequence[int]) -> list[tuple[int, int]]:
    out, t = [], 0
    for n in lengths:
        out.append((t, t + n))
        t += n
    return out


def crop(x: torch.Tensor, have: Region, want: Region) -> torch.Tensor:
    ys, xs = want.within(have)
    return x[..., ys, xs]


@dataclass
class Run:
    """Everything the engine needs besides the network and plan."""

    device: torch.device
    park: torch.device  # where tensors between segments wait
    output: torch.device  # where the final result goes
    fixed_stats: dict[int, Moments] = field(default_factory=dict)  # fast mode: step index -> stats
    tick: Callable[[], None] = lambda: None  # called after each tile x chunk
    ranks: distributed.Ranks | None = None  # tile-parallel over a process group; None: this process alone


def execute(net: Network, segments: Sequence, x: torch.Tensor, run: Run) -> torch.Tensor | None:
    """Run ``net`` on ``x`` following ``segments`` (objects with start, stop, layout).

    None only on the ranks of a tile-parallel run that do not receive the result (``Ranks.dst``).
    """
    steps = net.steps
    skip_sources = {s.skip for s in steps if s.skip is not None}
    lengths = net.chunks(x.shape[2]) if net.chunks else None
    cur = Frames(x, bounds_of(lengths) if lengths else None, owned=False)
    kept: dict[int, Frames] = {}
    pending: Moments | None = None
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg.start in skip_sources:
            kept[seg.start] = cur
        stats = dict(run.fixed_stats)
        if steps[seg.start].norm is not None and seg.start not in stats:
            if pending is None:
                raise RuntimeError(f"no statistics for {steps[seg.start].name}: the plan must cut before it")
            stats[seg.start] = pending
        nxt = steps[seg.stop] if seg.stop < len(steps) else None
        groups = nxt.norm.num_groups if nxt is not None and nxt.norm is not None and seg.stop not in stats else None
        target = run.output if last else run.park
        if steps[seg.start].is_global:
            cur, pending = _run_global(steps[seg.start], cur, stats.get(seg.start), groups, target, run)
        else:
            reuse = _reusable(steps, seg, kept, target, cur)
            cur, pending = _run_tiled(net, seg, cur, kept, stats, groups, target, run, skip_sources, reuse)
            if run.ranks is not None:  # distributed: what later tiles read from other ranks; moments all-reduced
                cur = distributed.assemble(cur, steps, segments, i, run.ranks, target, run.device)
                if groups:
                    pending = distributed.all_reduce(pending, groups, cur.tensor.shape[0], run.ranks, run.device)
        for j in [j for j in kept if all(s.skip != j for s in steps[seg.stop :])]:
            del kept[j]
    return cur.tensor


def _run_global(step: Step, cur: Frames, stats, groups, target, run: Run):
    pieces, parts = [], []
    for i, chunk in enumerate(cur.chunks()):
        y = step.fn(cur.read(chunk).to(run.device), Ctx(first=i == 0, stats=stats))
        if groups:
            parts.append(Moments.of(y, groups))
        pieces.append(y.to(target))
        run.tick()
    out = torch.cat(pieces, dim=2) if cur.bounds is not None else pieces[0]
    return Frames(out, cur.bounds), merge_all(parts) if parts else None


def _reusable(steps: Sequence[Step], seg, kept: dict[int, Frames], target: torch.device,
              source: Frames) -> Frames | None:
    """A kept residual input that this segment's output may overwrite in place.

    When a segment ends in a step that joins a residual from an earlier cut, each tile reads that
    residual only at its own core, just before writing its result there; if no later step needs
    the residual, the output can take its memory (SD resnets: one full-frame tensor fewer). Never
    the segment's own input, which later tiles still read around their cores (their halos).
    """
    last = steps[seg.stop - 1]
    src = kept.get(last.skip) if last.skip is not None else None
    if src is None or not src.owned or src.tensor.device != target:
        return None
    if src.tensor.untyped_storage().data_ptr() == source.tensor.untyped_storage().data_ptr():
        return None
    if any(s.skip == last.skip for s in steps[seg.stop :]):
        return None
    return src


def _run_tiled(net: Network, seg, cur: Frames, kept, stats, groups, target, run: Run, skip_sources, reuse):
    steps = net.steps[seg.start : seg.stop]
    fps = [s.footprint for s in steps]
    out: torch.Tensor | None = None
    out_bounds = None
    parts: list[Moments] = []
    for core in distributed.share(seg.layout, run.ranks):  # all tiles, or this rank's share
        regions = halo_regions(fps, core, cur.size)
        caches = [[None] * s.cache_slots for s in steps]
        pieces = []
        for ci, chunk in enumerate(cur.chunks()):
            t = cur.read(chunk, regions[0]).to(run.device)
            inputs: dict[int, tuple[torch.Tensor, Region]] = {}
            for k, step in enumerate(steps):
                idx = seg.start + k
                if idx in skip_sources:
                    inputs[idx] = (t, regions[k])
                got = produced(step.footprint, regions[k])
                t = crop(step.fn(t, Ctx(caches[k], ci == 0, stats.get(idx))), got, regions[k + 1])
                if step.skip is not None:
                    if step.skip in inputs:
                        skip = crop(*inputs[step.skip], regions[k + 1])
                    else:
                        src = kept[step.skip]
                        skip = src.read(src.chunks()[ci], regions[k + 1]).to(run.device)
                    t = step.join(t, skip)
            if groups:
                parts.append(Moments.of(t, groups))
            pieces.append(t.to(target))
            run.tick()
        del caches
        tile = torch.cat(pieces, dim=2) if cur.bounds is not None else pieces[0]
        if out is None:
            shape = (*tile.shape[:-2], *seg.size_out)
            if _whole(tile, shape):  # a single tile that is the whole output already: no copy
                out = tile
            elif reuse is not None and reuse.tensor.shape == shape and reuse.tensor.dtype == tile.dtype:
                out = reuse.tensor
            else:
                out = torch.empty(shape, dtype=tile.dtype, device=target)
            out_bounds = bounds_of([p.shape[2] for p in pieces]) if cur.bounds is not None else None
        if out is not tile:
            out[..., core.y[0] : core.y[1], core.x[0] : core.x[1]] = tile
    assert out is not None or run.ranks is not None, "a segment with an empty layout"
    return Frames(out, out_bounds), merge_all(parts) if parts else None


def _whole(tile: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``tile`` has the output's shape and a contiguous memory of its own (not a view into a
    larger tensor), so it can be the output itself."""
    return tile.shape == shape and tile.is_contiguous() and tile.untyped_storage().nbytes() == tile.nbytes
