"""The engine: executes any network description tile by tile, segment by segment.

An adapter describes a network as a list of :class:`Step` s (the model's own blocks, each with its
footprint). A plan cuts that list into segments and gives each local segment a tile layout. For
every tile the engine walks the segment's footprints backwards to get the region each block must
see, then streams the time chunks through the blocks in order, cropping after each block, with a
causal cache of the tile's own; the tile's core is written into the segment's output. Segments
that need the whole frame (attention) run untiled on the materialised tensor between segments.
GroupNorm statistics are accumulated from the cores the previous segment writes. Videos run in
time windows (see "windows" below), so what waits between segments is one window, not the clip.
A tile that runs out of memory is split and the run goes on (``_run_tiled``, ``Run.retile``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import torch
from torch import nn

from . import distributed
from .errors import TORCH_OOM, OutOfMemoryError
from .geometry import POINTWISE, Footprint, Layout, Region, halo_regions, need, produced, sizes_along
from .norm import Moments, merge_all

before_tile: Callable[[int, int, Region, int], None] | None = None
"""Test hook: called before each tile x time chunk with (segment index, tile index in the segment's
current layout, the tile's core, index of the chunk in the clip); tests set it to raise ``torch.OutOfMemoryError``."""


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
    to this step's result by ``join(result, skip_input)`` (a residual that spans a GroupNorm, or a
    level of blocks); the join runs after cropping, so it reads the skip input only where this
    step's output is kept. A residual that changes resolution (Wan 2.2's ``DupUp3D``) passes the skip
    input through ``shortcut(x, ctx)`` first, and ``skip_footprint`` says how that maps regions.
    """

    name: str
    fn: Callable[[torch.Tensor, Ctx], torch.Tensor]
    channels: tuple[int, int]
    footprint: Footprint = POINTWISE
    is_global: bool = False
    norm: nn.GroupNorm | None = None
    skip: int | None = None
    join: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    shortcut: Callable[[torch.Tensor, Ctx], torch.Tensor] | None = None  # applied to the skip input first
    skip_footprint: Footprint = POINTWISE  # from the skip input to this step's output
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
    start: int = 0  # index in the whole clip of its first time chunk (a window's place in the stream)

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
    park: torch.device  # where tensors wait between segments
    output: torch.device  # where the final result goes
    fixed_stats: dict[int, Moments] = field(default_factory=dict)  # fast mode: step index -> stats
    tick: Callable[[], None] = lambda: None  # called after each tile x chunk
    ranks: distributed.Ranks | None = None  # tile-parallel over a process group; None: this process alone
    caches: torch.device | None = None  # where causal caches wait between windows (None: the device)
    retile: Retile | None = None  # smaller tiles after running out of memory (None: the error propagates)


class Retile(Protocol):
    """The layouts segments run, made smaller when a tile runs out of memory (``planner.Replanner``)."""

    def layout(self, segment: int) -> Layout:
        """The layout segment ``segment`` runs now (the same every time, once it has run)."""

    def shrink(self, segment: int, tile: int, restart: bool = False) -> Layout:
        """After tile ``tile`` ran out of memory: the segment's new layout (the tiles before ``tile``
        unchanged, the rest smaller); with ``restart`` every segment is laid out again when next run.
        Raises :class:`OutOfMemoryError` when the tile is already the smallest the model allows."""


class _Restart(OutOfMemoryError):
    """A tile whose causal caches carry over from earlier time windows ran out of memory: splitting
    it would lose them, so the run must start again (``execute`` does; a stream that has yielded
    frames cannot)."""

    def __init__(self, segment: int, tile: int, start: int):
        super().__init__(
            f"out of memory in segment {segment}, tile {tile}, in the time window from chunk {start}: its causal "
            "caches carry over from earlier windows, so it cannot be split there, and a stream cannot go back over "
            "frames it has yielded; pass a smaller tile or budget"
        )
        self.segment, self.tile = segment, tile


# ------------------------------------------------------------------------------------------ windows
#
# A temporal network streams time in chunks (the Wan encoder: 1 frame, then 4; the decoder: 1 latent
# frame); chunk i of the input becomes chunk i at every step, whatever the time scales, so a window
# is a run of consecutive chunk indices. Segments with the same ``window`` form a pass: the pass runs
# its windows one after the other, and each window through all its segments, tile by tile; every
# (segment, tile) keeps its causal cache from one window to the next. Between passes the whole clip
# is materialised. A segment with ``window=None`` runs the whole clip in one window (tile-outer,
# time-inner), so only one tile's caches are alive at a time. A temporal halo (look-ahead frames for
# a non-causal decoder) would extend a window by frames read from the next one.


def window_of(seg) -> int | None:
    """Chunks per window of a segment (None: the whole clip at once)."""
    return getattr(seg, "window", None)


class Caches:
    """Causal caches of every (segment, tile) of a pass, kept from one window to the next."""

    def __init__(self, device: torch.device, store: torch.device | None):
        self.device, self.store = device, store if store is not None else device
        self.slots: dict[tuple[int, int], list[list]] = {}

    def take(self, key: tuple[int, int], steps: Sequence[Step]) -> list[list]:
        """The tile's caches on the device (empty slots on its first window)."""
        found = self.slots.pop(key, None)
        return [[None] * s.cache_slots for s in steps] if found is None else _moved(found, self.device)

    def put(self, key: tuple[int, int], caches: list[list]) -> None:
        self.slots[key] = _moved(caches, self.store)


def _moved(caches: list[list], device: torch.device) -> list[list]:
    return [[c.to(device) if isinstance(c, torch.Tensor) else c for c in slots] for slots in caches]


def passes(segments: Sequence) -> list[list[tuple[int, object]]]:
    """Consecutive segments with the same window length, with their indices."""
    out: list[list[tuple[int, object]]] = []
    for i, seg in enumerate(segments):
        if out and window_of(out[-1][-1][1]) == window_of(seg):
            out[-1].append((i, seg))
        else:
            out.append([(i, seg)])
    return out


def _windows(chunks: Iterable[torch.Tensor] | Frames, size: int | None) -> Iterator[Frames]:
    """Group a stream of time chunks into windows of ``size`` chunks (None: all of them).

    A whole clip already in memory (``Frames``) is one window as it is, or split into views.
    """
    if isinstance(chunks, Frames):
        if size is None:
            yield chunks
            return
        clip = chunks
        chunks = (clip.read(b) for b in clip.chunks())
    batch: list[torch.Tensor] = []
    start = 0
    for chunk in chunks:
        batch.append(chunk)
        if size is not None and len(batch) == size:
            window, batch = _window(batch, start), []  # the chunks are not held while the window runs
            start += size
            yield window
    if batch:
        window, batch = _window(batch, start), []
        yield window


def _window(chunks: list[torch.Tensor], start: int) -> Frames:
    tensor = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    return Frames(tensor, bounds_of([c.shape[2] for c in chunks]), owned=len(chunks) > 1, start=start)


def frames_out(net: Network, lengths: Sequence[int]) -> int:
    """Frames that ``net`` makes from input chunks of ``lengths`` (the first chunk is never rescaled)."""
    scale = math.prod((s.time_scale for s in net.steps), start=Fraction(1))
    return lengths[0] + int(sum(Fraction(n) * scale for n in lengths[1:]))


def execute(net: Network, segments: Sequence, x: torch.Tensor, run: Run) -> torch.Tensor | None:
    """Run ``net`` on ``x`` following ``segments`` (objects with start, stop, layout[, window]).

    None only on the ranks of a tile-parallel run that do not receive the result (``Ranks.dst``).
    When a tile whose causal caches carry over from earlier windows runs out of memory, the run
    starts again from the first window with smaller tiles (see ``_run_tiled``): still exact.
    """
    while True:
        try:
            return _execute(net, segments, x, run)
        except _Restart as e:
            where = e.segment, e.tile
        run.retile.shrink(*where, restart=True)


def _execute(net: Network, segments: Sequence, x: torch.Tensor, run: Run) -> torch.Tensor | None:
    if not net.temporal:
        return _run_window(net, segments, Frames(x, None, owned=False), Caches(run.device, run.caches), run,
                           run.output).tensor
    lengths = net.chunks(x.shape[2])
    total = frames_out(net, lengths)
    out: torch.Tensor | None = None
    t = 0
    for piece in stream(net, segments, Frames(x, bounds_of(lengths), owned=False), run):
        if piece is None:  # tile-parallel: this window went to another rank
            continue
        if piece.shape[2] == total:  # the clip in one window: already whole
            return piece
        if out is None:
            out = torch.empty((*piece.shape[:2], total, *piece.shape[3:]), dtype=piece.dtype, device=piece.device)
        out[:, :, t : t + piece.shape[2]] = piece
        t += piece.shape[2]
    assert out is None or t == out.shape[2], "the stream ended early"
    return out


def stream(
    net: Network, segments: Sequence, chunks: Iterable[torch.Tensor] | Frames, run: Run
) -> Iterator[torch.Tensor]:
    """Run a temporal ``net`` on a stream of input time chunks (or a whole clip); yields the output
    window by window."""
    groups = passes(segments)
    total = len(chunks.chunks()) if isinstance(chunks, Frames) else None  # a stream's end is not known
    flow: Iterable[torch.Tensor] | Frames = chunks
    for k, group in enumerate(groups):
        last = k == len(groups) - 1
        done = _run_pass(net, group, flow, run, run.output if last else run.park, segments, total)
        if last:
            yield from (window.tensor for window in done)
        else:
            flow = (window.read(b) for window in done for b in window.chunks())


def _run_pass(net: Network, group, chunks: Iterable[torch.Tensor] | Frames, run: Run, target,
              every: Sequence, total: int | None = None) -> Iterator[Frames]:
    """One pass: its windows one after the other, each through all the pass's segments.

    ``total``: chunks in the clip, when known; the caches of its last window are then dropped tile
    by tile instead of being kept for a window that never comes (a single image or a short clip
    holds one tile's caches, not every tile's).
    """
    size = window_of(group[0][1])
    caches = Caches(run.device, run.caches if size is not None else None)
    for window in _windows(chunks, size):
        ends = total is not None and window.start + len(window.chunks()) >= total
        yield _run_window(net, [seg for _, seg in group], window, caches, run, target, [i for i, _ in group], every,
                          ends)


def _run_window(net: Network, segments: Sequence, cur: Frames, caches: Caches, run: Run, target,
                keys: Sequence[int] | None = None, every: Sequence | None = None, ends: bool = False) -> Frames:
    """Run ``cur`` (one window of frames, or a whole image) through ``segments`` in order.

    ``keys``: the segments' indices in the plan's list ``every`` (default: ``segments`` is the plan);
    ``ends``: no window follows this one.
    """
    steps = net.steps
    keys = list(range(len(segments))) if keys is None else keys
    every = segments if every is None else every
    skip_sources = {s.skip for s in steps if s.skip is not None}
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
        out_to = target if last else run.park
        if steps[seg.start].is_global:
            cur, pending = _run_global(steps[seg.start], cur, stats.get(seg.start), groups, out_to, run)
        else:
            reuse = _reusable(steps, seg, kept, out_to, cur)
            windowed = window_of(seg) is not None
            state = _TileCaches(caches, keys[i], carried=windowed and cur.start > 0, keep=windowed and not ends)
            cur, pending = _run_tiled(net, seg, cur, kept, stats, groups, out_to, run, skip_sources, reuse, state)
            if run.ranks is not None:  # distributed: what later tiles read from other ranks; moments all-reduced
                cur = distributed.assemble(cur, steps, every, keys[i], run.ranks, out_to, run.device)
                if groups:
                    pending = distributed.all_reduce(pending, groups, cur.tensor.shape[0], run.ranks, run.device)
        for j in [j for j in kept if all(s.skip != j for s in steps[seg.stop :])]:
            del kept[j]
    return cur


@dataclass
class _TileCaches:
    """The caches of one segment's tiles within a pass: kept across windows, or dropped per tile."""

    caches: Caches
    segment: int
    carried: bool  # the tiles' caches come from earlier windows
    keep: bool  # a later window needs them

    def take(self, tile: int, steps: Sequence[Step]) -> list[list]:
        return self.caches.take((self.segment, tile), steps)

    def put(self, tile: int, caches: list[list]) -> None:
        if self.keep:
            self.caches.put((self.segment, tile), caches)


def _run_global(step: Step, cur: Frames, stats, groups, target, run: Run):
    pieces, parts = [], []
    for i, chunk in enumerate(cur.chunks()):
        y = step.fn(cur.read(chunk).to(run.device), Ctx(first=cur.start + i == 0, stats=stats))
        if groups:
            parts.append(Moments.of(y, groups))
        pieces.append(y.to(target))
        run.tick()
    out = torch.cat(pieces, dim=2) if cur.bounds is not None else pieces[0]
    return Frames(out, cur.bounds, start=cur.start), merge_all(parts) if parts else None


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


def _run_tiled(net: Network, seg, cur: Frames, kept, stats, groups, target, run: Run, skip_sources, reuse,
               state: _TileCaches):
    """Run one local segment tile by tile and write each tile's core into its output.

    Out of memory: a tile that raises ``torch.OutOfMemoryError`` is dropped (its pieces, moments
    and caches) and ``run.retile`` splits it and the segment's remaining tiles under a lower limit;
    the tiles already written stay, since the tiles of a segment are independent, and so do the
    moments merged from them and the statistics this segment normalises with. Only a tile whose
    causal caches carry over from an earlier time window cannot be split (its new pieces would
    have no caches): then the whole run starts again (``_Restart``). Tile-parallel runs never split
    (every rank runs the same layout).
    """
    steps = net.steps[seg.start : seg.stop]
    retile = run.retile  # None in tile-parallel runs: every rank must run the same layout
    layout = retile.layout(state.segment) if retile is not None else seg.layout
    out: torch.Tensor | None = None
    out_bounds = None
    parts: list[Moments] = []
    todo = distributed.mine(layout, run.ranks)  # all tiles, or this rank's share
    while todo:
        ti, todo = todo[0], todo[1:]
        core = layout[ti]
        caches = state.take(ti, steps)
        mark = len(parts)
        try:
            pieces = _run_tile(steps, seg.start, cur, core, caches, kept, stats, groups, target, run, skip_sources,
                               parts, (state.segment, ti), release=not state.keep)
        except TORCH_OOM:
            if retile is None:
                raise
            pieces = None  # leaving the handler frees the tile's tensors held by the traceback
        if pieces is None:
            del parts[mark:]
            caches = None
            _free(run.device)
            if state.carried:
                raise _Restart(state.segment, ti, cur.start)
            layout = retile.shrink(state.segment, ti)
            todo = list(range(ti, len(layout)))
            continue
        state.put(ti, caches)
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
    return Frames(out, out_bounds, start=cur.start), merge_all(parts) if parts else None


def _run_tile(steps: Sequence[Step], start: int, cur: Frames, core: Region, caches: list[list], kept, stats, groups,
              target, run: Run, skip_sources, parts: list[Moments], where: tuple[int, int],
              release: bool = False) -> list[torch.Tensor]:
    """One tile of a segment (steps ``start:``), chunk by chunk: its output pieces on ``target``;
    the moments of each piece are appended to ``parts``. With ``release`` (no later window needs
    the tile's caches) each step's cache is emptied once it has run the last chunk, so a tile of a
    single image holds one step's caches at a time, not every step's."""
    regions = halo_regions([s.footprint for s in steps], core, cur.size)
    sizes = sizes_along([s.footprint for s in steps], cur.size)
    pieces = []
    for ci, chunk in enumerate(cur.chunks()):
        if before_tile is not None:
            before_tile(*where, core, cur.start + ci)
        t = cur.read(chunk, regions[0]).to(run.device)
        inputs: dict[int, tuple[torch.Tensor, Region]] = {}
        for k, step in enumerate(steps):
            idx = start + k
            if idx in skip_sources:
                inputs[idx] = (t, regions[k])
            got = produced(step.footprint, regions[k])
            ctx = Ctx(caches[k], cur.start + ci == 0, stats.get(idx))
            t = crop(step.fn(t, ctx), got, regions[k + 1])
            if release and ci == len(cur.chunks()) - 1:
                caches[k][:] = [None] * len(caches[k])
            if step.skip is not None:
                inside = step.skip in inputs
                size = sizes[step.skip - start] if inside else kept[step.skip].size
                want = need(step.skip_footprint, regions[k + 1], size)
                if inside:
                    skip = crop(*inputs[step.skip], want)
                else:
                    src = kept[step.skip]
                    skip = src.read(src.chunks()[ci], want).to(run.device)
                if step.shortcut is not None:
                    skip = crop(step.shortcut(skip, ctx), produced(step.skip_footprint, want), regions[k + 1])
                t = step.join(t, skip)
        if groups:
            parts.append(Moments.of(t, groups))
        pieces.append(t.to(target))
        run.tick()
    return pieces


def _free(device: torch.device) -> None:
    """Give the memory of a failed tile back to the device, so the smaller tiles find it unfragmented."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _whole(tile: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``tile`` has the output's shape and a contiguous memory of its own (not a view into a
    larger tensor), so it can be the output itself."""
    return tile.shape == shape and tile.is_contiguous() and tile.untyped_storage().nbytes() == tile.nbytes
