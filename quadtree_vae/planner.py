"""The planner: cut a network into segments and give each a tile layout that fits a memory limit.

Cuts are forced before steps that need whole-frame statistics (GroupNorm, exact mode) and around
steps that need the whole frame (attention); the planner adds a cut wherever the resolution
changes, so each segment recomputes only its own few pixels of halo. Each local segment is split
as a quadtree until every tile's estimated peak fits the limit. The limit comes from ``tile`` and/or
``budget``. ``tile`` bounds the regions that blocks run on at image resolution, halo included, so a
block never sees more than ``tile x tile`` pixels there; segments at lower resolution get tiles that
need no more memory than such a tile (larger in image pixels, so they recompute less).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import NamedTuple

import torch

from .engine import Network, Step, passes
from .errors import InvalidInputError, OutOfMemoryError
from .geometry import Layout, Region, check_layout, full, halo_regions, produced, quadtree, sizes_along, subdivide

MIN_TILE = 16  # px on the image side: two latent pixels; below it the halo is most of the work
CACHE_T = 2  # frames a causal 3x3x3 conv keeps between chunks
MAX_WINDOW = 16  # time chunks per window at most: beyond it, longer windows only hold more


@dataclass(frozen=True)
class Segment:
    """A run of steps executed with one tiling (or untiled, for a global step)."""

    start: int
    stop: int
    names: tuple[str, ...]
    is_global: bool
    size_in: tuple[int, int]
    size_out: tuple[int, int]
    layout: Layout
    peak: int  # estimated device bytes of its largest tile
    work: float  # estimated multiply-adds with halos recomputed
    work_untiled: float
    halo: int  # widest halo of any tile, in pixels of the segment's input
    cache: int = 0  # bytes of the causal caches of all its tiles together
    window: int | None = None  # time chunks per window; None: the whole clip (or image) at once


@dataclass(frozen=True)
class Plan:
    """How one encode or decode will run: segments, their tile layouts and memory estimates."""

    op: str
    network: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    mode: str
    segments: tuple[Segment, ...]
    tile_limit: int  # bytes a tile may use on the device
    budget: int | None
    park: str  # "device" or "cpu": where tensors wait between segments
    cut_bytes: int  # largest set of tensors alive between segments (windows, and whole clips between passes)
    window: int | None = None  # time chunks (= latent frames) per window of the windowed segments
    cache_bytes: int = 0  # causal caches kept from one window to the next
    cache_at: str = "device"  # "device" or "cpu": where those caches wait
    chunks: int = 1  # time chunks of the whole clip
    _held: Callable[[Sequence[Segment]], int] | None = field(default=None, repr=False, compare=False)
    _est: _Estimator | None = field(default=None, repr=False, compare=False)  # model-free: new layouts, replanning

    @property
    def peak(self) -> int:
        """Estimated device bytes at the worst moment (largest tile, plus what waits there)."""
        tiles = max(s.peak for s in self.segments)
        return tiles + (self.cut_bytes if self.park == "device" else 0) + (
            self.cache_bytes if self.cache_at == "device" else 0)

    @property
    def held_bytes(self) -> int:
        """Bytes held besides the running tile: tensors between segments and causal caches."""
        return self.cut_bytes + self.cache_bytes

    @property
    def overhead(self) -> float:
        """Work done relative to the untiled model (halo recompute)."""
        return sum(s.work for s in self.segments) / max(1.0, sum(s.work_untiled for s in self.segments))

    @property
    def tiles(self) -> int:
        return sum(len(s.layout) for s in self.segments)

    def with_layouts(self, layouts: Mapping[int, Sequence[Region]]) -> Plan:
        """A copy with the given segments (by index) tiled as given; other segments unchanged."""
        segs = list(self.segments)
        for i, layout in layouts.items():
            seg = segs[i]
            if seg.is_global:
                raise InvalidInputError(f"segment {i} ({seg.names[0]}) needs the whole frame and cannot be tiled")
            layout = tuple(layout)
            try:
                check_layout(layout, *seg.size_out)
            except ValueError as e:
                raise InvalidInputError(f"layout for segment {i}: {e}") from e
            segs[i] = self._est.segment(seg.start, seg.stop, layout, seg.is_global, seg.window) if self._est else \
                replace(seg, layout=layout)
        return replace(self, segments=tuple(segs), cache_bytes=_cache_held(segs, self.chunks))

    def with_window(self, window: int | None) -> Plan:
        """A copy in which every segment runs ``window`` time chunks (latent frames) at a time, None:
        the whole clip at once (tile-outer, as before windows); the held bytes are counted again."""
        if self._held is None:
            raise InvalidInputError(f"{self.network} does not run in time windows (no time axis, or whole-clip norms)")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise InvalidInputError(f"window must be a positive number of latent frames or None, not {window!r}")
        segs = tuple(replace(s, window=window) for s in self.segments)
        return replace(self, segments=segs, window=window, cut_bytes=self._held(segs),
                       cache_bytes=_cache_held(segs, self.chunks))

    def describe(self) -> str:
        """A human-readable table of the plan."""
        lines = [
            f"{self.op} with {self.network}: {tuple(self.in_shape)} -> {tuple(self.out_shape)}, mode={self.mode}",
            f"tile limit {fmt_bytes(self.tile_limit)}, budget {fmt_bytes(self.budget) if self.budget else 'none'}, "
            f"tensors between segments on {self.park} ({fmt_bytes(self.cut_bytes)}), "
            f"estimated peak {fmt_bytes(self.peak)}, work {self.overhead:.3f}x untiled",
            *([f"estimated peak exceeds the budget by {fmt_bytes(self.peak - self.budget)}: running this plan "
               "is refused"] if self.budget and self.peak > self.budget else []),
        ]
        if self._held is not None:
            lines.append(
                f"time windows of {self.window or 'all'} latent frame(s) of {self.chunks}; causal caches "
                f"{fmt_bytes(self.cache_bytes)} on {self.cache_at}; held {fmt_bytes(self.held_bytes)} "
                f"(tensors on {self.park}, caches on {self.cache_at})"
            )
            whole = [i for i, s in enumerate(self.segments) if s.window is None and not s.is_global]
            if whole and self.window is not None:
                lines.append(
                    f"to fit the budget, segment(s) {', '.join(map(str, whole))} run the whole clip one tile at a "
                    f"time (one tile's caches alive, wider halo), at {self.overhead:.2f}x the untiled work"
                )
        lines.append(f"{'#':>3} {'steps':<34} {'in':>11} {'out':>11} {'tiles':>5} {'halo':>4} {'peak':>9} "
                     f"{'work':>6} {'window':>6} {'cache':>9}")
        for i, s in enumerate(self.segments):
            names = _names(s)
            lines.append(
                f"{i:>3} {names[:34]:<34} {_wxh(s.size_in):>11} {_wxh(s.size_out):>11} "
                f"{'all' if s.is_global else len(s.layout):>5} {s.halo:>4} {fmt_bytes(s.peak):>9} "
                f"{s.work / max(1.0, s.work_untiled):>5.2f}x {s.window or 'all':>6} "
                f"{fmt_bytes(s.cache) if s.window else '1 tile':>9}"
            )
        return "\n".join(lines)


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ------------------------------------------------------------------------------------------ sizes

def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


# ------------------------------------------------------------------------------------ estimation


@dataclass(frozen=True)
class _Frames:
    """Largest chunk and total frames at the input of each step (and after the last)."""

    largest: list[int]
    total: list[int]


def _frames(net: Network, t: int) -> _Frames:
    if not net.temporal:
        n = len(net.steps) + 1
        return _Frames([1] * n, [1] * n)
    lengths = net.chunks(t)
    first, rest = Fraction(lengths[0]), [Fraction(n) for n in lengths[1:]]
    largest, total = [], []
    for i in range(len(net.steps) + 1):
        largest.append(math.ceil(max([first, *rest])))
        total.append(math.ceil(first + sum(rest)))
        if i < len(net.steps):
            rest = [n * net.steps[i].time_scale for n in rest]
    return _Frames(largest, total)


class _Estimator:
    """Memory and work of a tile of a segment, from channel counts, regions and frames."""

    def __init__(self, net: Network, frames: _Frames, sizes: list[tuple[int, int]], batch: int, elem: int):
        self.net, self.frames, self.sizes, self.batch, self.elem = net, frames, sizes, batch, elem

    def tile(self, start: int, stop: int, core: Region) -> tuple[int, float, int]:
        """(peak bytes, multiply-adds, widest halo) of one tile of steps ``start:stop``."""
        steps = self.net.steps[start:stop]
        regions = halo_regions([s.footprint for s in steps], core, self.sizes[start])
        live, work = 0, 0.0
        for k, step in enumerate(steps):
            c_in, c_out = step.channels
            f_in, f_out = self.frames.largest[start + k], self.frames.largest[start + k + 1]
            pad = CACHE_T if step.cache_slots else 0
            a_in, a_out = regions[k].area, produced(step.footprint, regions[k]).area
            x_in, x_out = c_in * a_in * (f_in + pad), c_out * a_out * f_out
            live = max(live, x_in + x_out + step.temporaries * max(x_in, x_out))
            work += step.work * a_out * self.frames.total[start + k + 1]
        first = regions[0]
        ratio_y = self.sizes[start][0] / max(1, self.sizes[stop][0])
        ratio_x = self.sizes[start][1] / max(1, self.sizes[stop][1])
        halo = max(
            round(core.y[0] * ratio_y) - first.y[0], first.y[1] - round(core.y[1] * ratio_y),
            round(core.x[0] * ratio_x) - first.x[0], first.x[1] - round(core.x[1] * ratio_x), 0,
        )
        return int(live * self.batch * self.elem) + self._cache(steps, regions), work * self.batch, halo

    def cache(self, start: int, stop: int, core: Region) -> int:
        """Bytes of the causal caches one tile of steps ``start:stop`` keeps between time chunks."""
        steps = self.net.steps[start:stop]
        return self._cache(steps, halo_regions([s.footprint for s in steps], core, self.sizes[start]))

    def _cache(self, steps: Sequence[Step], regions: Sequence[Region]) -> int:
        slots = sum(s.cache_slots * s.channels[0] * r.area for s, r in zip(steps, regions))
        return slots * CACHE_T * self.batch * self.elem

    def align(self, stop: int) -> int:
        """The grid the tiles of a segment ending at step ``stop`` are cut on: one latent pixel,
        also the smallest tile side."""
        image = max(self.sizes, key=lambda s: s[0] * s[1])
        return max(1, self.net.spatial_factor * self.sizes[stop][0] // image[0])

    def image_extent(self, start: int, stop: int, core: Region, image: tuple[int, int]) -> tuple[int, int]:
        """Largest height and width of the regions a tile runs on at image resolution (halo included)."""
        regions = halo_regions([s.footprint for s in self.net.steps[start:stop]], core, self.sizes[start])
        at_image = [r for k, r in enumerate(regions) if self.sizes[start + k] == image] or [core]
        return max(r.h for r in at_image), max(r.w for r in at_image)

    def segment(self, start: int, stop: int, layout: Layout, is_global: bool, window: int | None = None) -> Segment:
        peaks, works, halos = zip(*(self.tile(start, stop, core) for core in layout))
        untiled = self.tile(start, stop, full(*self.sizes[stop]))[1]
        cache = sum(self.cache(start, stop, core) for core in layout)
        return Segment(
            start, stop, tuple(s.name for s in self.net.steps[start:stop]), is_global,
            self.sizes[start], self.sizes[stop], layout, max(peaks), sum(works), untiled, max(halos),
            cache, window,
        )

    def frame_bytes(self, i: int, window: int | None = None) -> int:
        """Bytes of the tensor at the input of step ``i``: all frames, or a window of ``window`` chunks."""
        c = self.net.steps[i].channels[0] if i < len(self.net.steps) else self.net.steps[-1].channels[1]
        h, w = self.sizes[i]
        frames = self.frames.total[i] if window is None else min(self.frames.total[i], window * self.frames.largest[i])
        return c * h * w * frames * self.batch * self.elem

    def held(self, segments: Sequence[Segment]) -> int:
        """Largest set of tensors alive between segments: a segment's input and output (a window of
        them in a windowed pass) and the whole-clip tensors between passes around it (the model's
        output is not counted; its input only where a pass reads it whole)."""
        n = len(self.net.steps)
        passes = _passes_of(segments)
        worst = 0
        for k, group in enumerate(passes):
            w = group[0].window
            around = 0
            if w is not None:
                around += self.frame_bytes(group[0].start) if k > 0 else 0
                around += self.frame_bytes(group[-1].stop) if k < len(passes) - 1 else 0
            for seg in group:
                out = self.frame_bytes(seg.stop, w) if seg.stop < n else 0
                worst = max(worst, around + self.frame_bytes(seg.start, w) + out)
        return worst


# ---------------------------------------------------------------------------------------- planning


def cut_points(net: Network, mode: str, resolution: bool = True) -> list[int]:
    """Step indices where a segment starts (only the forced cuts without ``resolution``)."""
    steps = net.steps
    sizes = sizes_along([s.footprint for s in steps], (1024, 1024))
    cuts = {0}
    for i, s in enumerate(steps):
        if s.is_global:
            cuts |= {i, i + 1}
        if s.norm is not None and mode == "exact":
            cuts.add(i)
        if not resolution:
            continue
        # cut where the tensor is smallest: after a downsampler, before an upsampler; a pure
        # reshape (patchify) changes the resolution but not the size, so it stays inside a segment
        before, after = s.channels[0] * sizes[i][0] * sizes[i][1], s.channels[1] * sizes[i + 1][0] * sizes[i + 1][1]
        if sizes[i + 1][0] < sizes[i][0] and after < before:
            cuts.add(i + 1)
        elif sizes[i + 1][0] > sizes[i][0] and after > before:
            cuts.add(i)
    for i, s in enumerate(steps):  # a residual that spans a cut reads a materialised input
        if s.skip is not None and any(s.skip < c <= i for c in cuts):
            cuts.add(s.skip)
    return sorted(c for c in cuts if c < len(steps))


class _Span(NamedTuple):
    """A segment before it has a layout: steps ``start:stop`` and its window."""

    start: int
    stop: int
    window: int | None


def _passes_of(segments: Sequence) -> list[list]:
    return [[seg for _, seg in group] for group in passes(segments)]


def _cache_held(segments: Sequence[Segment], chunks: int) -> int:
    """Caches that wait between windows: those of every tile of a segment that runs in several windows
    (a segment that runs the whole clip at once holds one tile's caches, counted in its tile peak)."""
    return sum(s.cache for s in segments if s.window is not None and s.window < chunks)


def _spans(cuts: Sequence[int], stop: int, window: int | None) -> list[_Span]:
    bounds = [*cuts, stop]
    return [_Span(a, b, window) for a, b in zip(bounds, bounds[1:])]


def _schedules(net: Network, mode: str, window: int | None) -> list[list[_Span]]:
    """Candidate schedules of a temporal network, cheapest first.

    First every segment in windows, caches of all tiles kept between windows. Then every segment
    through the whole clip, tile by tile (what waits between segments grows with the clip, but no
    caches wait: it fits short clips). Then, trading
    compute for memory, schedules where the runs of steps between forced cuts (attention, norms)
    become one segment each that runs the whole clip tile by tile (wider halo, but only one tile's
    caches alive and nothing waits inside the run); runs not chosen keep their windows.
    """
    n = len(net.steps)
    fine = cut_points(net, mode)
    forced = cut_points(net, mode, resolution=False)
    runs = list(zip(forced, [*forced[1:], n]))
    local = [r for r in runs if not net.steps[r[0]].is_global]
    out = [_spans(fine, n, window), _spans(fine, n, None)]
    for k in range(1, len(local) + 1):
        for whole in itertools.combinations(local, k):
            spans: list[_Span] = []
            for a, b in runs:
                if (a, b) in whole:
                    spans.append(_Span(a, b, None))
                else:
                    spans += _spans([c for c in fine if a <= c < b], b, window)
            out.append(spans)
    return out


def make_plan(
    net: Network,
    op: str,
    shape: Sequence[int],
    *,
    tile: tuple[int, int] | None,
    budget: int | None,
    device: torch.device,
    dtype: torch.dtype,
    mode: str = "exact",
) -> Plan:
    """Plan ``op`` of an input of ``shape`` (B, C, [T,] H, W) through ``net``.

    A video runs in time windows (one latent frame each while its causal caches stay on the device;
    sized to the budget when they wait on the host); when the caches of all tiles do not fit the
    budget, runs of steps go through the whole clip one tile at a time instead (see ``_schedules``).
    """
    batch, h, w = shape[0], shape[-2], shape[-1]
    frames = _frames(net, shape[2] if net.temporal else 1)
    elem = torch.finfo(dtype).bits // 8
    sizes = sizes_along([s.footprint for s in net.steps], (h, w))
    est = _Estimator(net, frames, sizes, batch, elem)
    image = max(sizes, key=lambda s: s[0] * s[1])
    n_steps = len(net.steps)
    chunks = len(net.chunks(shape[2])) if net.temporal else 1
    windowed = net.temporal and (mode == "fast" or all(s.norm is None for s in net.steps))

    probes = {} if tile is None else {
        (a, b): _probe(net, est, a, b, image, tile, frames, batch, elem)
        for a, b in zip(cut_points(net, mode), [*cut_points(net, mode)[1:], n_steps])
        if not net.steps[a].is_global and image in (sizes[a], sizes[b])
    }
    tile_limit = max((peak for _, peak in probes.values()), default=None)
    total = budget if budget is not None else int(0.9 * available_memory(device))

    def floor(spans: list[_Span]) -> int:  # caches if every segment were one tile
        return sum(est.cache(sp.start, sp.stop, full(*sizes[sp.stop])) for sp in spans
                   if sp.window is not None and sp.window < chunks)

    def placed(spans: list[_Span], cache: int) -> tuple[str, str, int]:
        """Where tensors between segments and caches wait, and the room left for tiles."""
        cut = est.held(spans)
        if budget is None and tile is not None:
            park = "cpu" if device.type == "cuda" else "device"
        else:
            park = "device" if device.type == "cpu" or cut <= total // 2 else "cpu"
        dev_cut = cut if park == "device" else 0
        cache_at = "device" if device.type == "cpu" or dev_cut + cache <= total // 2 else "cpu"
        return park, cache_at, total - dev_cut - (cache if cache_at == "device" else 0)

    def windowed_for(spans: list[_Span]) -> list[_Span]:
        """Longer windows when the caches wait on the host: they move to and from it less often."""
        if placed(spans, floor(spans))[1] == "device":
            return spans
        size = max(1, min(chunks, MAX_WINDOW, (total // 4) // max(1, est.held(spans))))
        return [sp._replace(window=size) if sp.window is not None else sp for sp in spans]

    def build(spans: list[_Span]) -> Plan:
        park, cache_at, room = placed(spans, floor(spans))
        if budget is None and tile is not None:
            room = tile_limit
        cut_bytes = est.held(spans)
        limit = room if tile_limit is None else min(tile_limit, room)
        if limit is None or limit <= 0:
            given = fmt_bytes(budget) if budget is not None else \
                f"90% of the free memory on {device.type} ({fmt_bytes(total)})"
            raise InvalidInputError(
                f"memory budget too small: {given} leaves no room for tiles once the "
                f"{fmt_bytes(cut_bytes)} of tensors between segments and {fmt_bytes(floor(spans))} of causal "
                f"caches are held"
            )

        def lay(limit: int) -> list[Segment]:
            return [_segment(net, est, sp, sizes, image, tile, probes, limit) for sp in spans]

        segments = lay(limit)
        for _ in range(3):  # tiles overlap, so their caches exceed the floor: shrink the tiles until all fits
            cache = _cache_held(segments, chunks)
            excess = max(s.peak for s in segments) + (cut_bytes if park == "device" else 0) + (
                cache if cache_at == "device" else 0) - total
            if cache == 0 or budget is None and tile is not None or excess <= 0 or limit - excess <= 0:
                break
            limit -= excess
            segments = lay(limit)
        windows = {sp.window for sp in spans if sp.window is not None}
        return Plan(
            op, net.name, tuple(shape), out_shape, mode, tuple(segments), int(limit), budget, park, cut_bytes,
            window=min(windows) if windows else None, cache_bytes=_cache_held(segments, chunks),
            cache_at=cache_at, chunks=chunks,
            _held=model_free.held if windowed else None, _est=model_free,
        )

    out_c = net.steps[-1].channels[1]
    out_shape = (batch, out_c, frames.total[-1], *sizes[-1]) if net.temporal else (batch, out_c, *sizes[-1])
    model_free = _Estimator(_shapes_only(net), frames, sizes, batch, elem)  # a plan must not keep the VAE alive
    if not windowed:
        return build(_spans(cut_points(net, mode), n_steps, None))
    smallest: Plan | None = None
    refusal: InvalidInputError | None = None
    for spans in _schedules(net, mode, 1):  # the cheapest schedule that fits; else the smallest peak
        try:
            plan = build(windowed_for(spans))
        except InvalidInputError as e:
            refusal = refusal or e
            continue
        if plan.peak <= total:
            return plan
        smallest = plan if smallest is None or plan.peak < smallest.peak else smallest
    if smallest is None:
        raise refusal
    return smallest


def _segment(net: Network, est: _Estimator, span: _Span, sizes, image, tile, probes, limit: int) -> Segment:
    """The segment of ``span``, split as a quadtree until every tile fits ``limit`` (and ``tile``)."""
    a, b = span.start, span.stop
    is_global = net.steps[a].is_global
    size = sizes[b]
    if is_global:
        return est.segment(a, b, (full(*size),), True, span.window)
    align = est.align(b)
    cap = probes[(a, b)][0] if (a, b) in probes else None

    def fits(r: Region) -> bool:
        if cap is not None:
            eh, ew = est.image_extent(a, b, r, image)
            if eh > tile[0] or ew > tile[1]:
                return False
        return est.tile(a, b, r)[0] <= limit

    return est.segment(a, b, quadtree(*size, fits, align=align, cap=cap), False, span.window)


def _shapes_only(net: Network) -> Network:
    """``net`` without the model: the steps keep their footprints, channels and costs but no
    modules, so a plan can re-estimate a segment without keeping the VAE alive, and pickles."""
    steps = [replace(s, fn=None, norm=None, join=None, shortcut=None) for s in net.steps]
    return Network(net.name, steps, net.in_channels, None)


def _probe(net, est: _Estimator, a: int, b: int, image, tile, frames, batch, elem) -> tuple[tuple[int, int], int]:
    """For a segment that runs at image resolution: the largest core (in its output grid) whose
    regions at image resolution, halo included, stay within ``tile`` when it has neighbours on every
    side; and the estimated peak bytes of such a tile, which becomes the limit for all segments."""
    big = (3 * tile[0], 3 * tile[1])  # a frame where the tile has neighbours on every side
    size_in = (big[0] * est.sizes[a][0] // image[0], big[1] * est.sizes[a][1] // image[1])
    fps = [s.footprint for s in net.steps[a:b]]
    sub = _Estimator(net, frames, [None] * a + sizes_along(fps, size_in), batch, elem)
    scale = (est.sizes[b][0] / image[0], est.sizes[b][1] / image[1])
    c = (max(1, round(tile[0] * scale[0])), max(1, round(tile[1] * scale[1])))
    ext = sub.image_extent(a, b, Region((c[0], 2 * c[0]), (c[1], 2 * c[1])), big)
    halo = max(e - t for t, e in zip(tile, ext))  # both sides together, image pixels
    smallest = -(-(halo + net.spatial_factor) // net.spatial_factor) * net.spatial_factor
    if min(tile) < smallest:
        raise InvalidInputError(
            f"tile {tile[0]}x{tile[1]} is below the minimum of {smallest} px for {net.name}: its blocks read "
            f"{halo // 2} px beyond a tile's core on each side at image resolution, and a core needs at least "
            f"{net.spatial_factor} px"
        )
    core = tuple(max(1, int((t - (e - t)) * sc)) for t, e, sc in zip(tile, ext, scale))
    return core, sub.tile(a, b, Region((core[0], 2 * core[0]), (core[1], 2 * core[1])))[0]


# ------------------------------------------------------------------------------------ out of memory


class Replanner:
    """Smaller tiles when a tile runs out of memory: the engine's ``Run.retile`` for ``plan``.

    The tile limit starts at the plan's. When a tile runs out of memory, the limit drops to half
    that tile's estimated peak (or half the limit, if lower); the tile and the rest of its segment
    are split as quadtrees under it, and so is every segment that has not run yet (the estimates
    were too low for this device). A warning names the new limit and tile size each time. A tile
    already at the smallest side the model allows (one latent pixel, :meth:`_Estimator.align`)
    cannot be split: then :class:`OutOfMemoryError` is raised, with the smallest plan tried.
    A segment's layout stays as it is once it has run: tile indices key causal caches across windows.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.limit = plan.tile_limit
        self.layouts: dict[int, Layout] = {}  # segment -> the layout it runs

    def layout(self, segment: int) -> Layout:
        """The layout ``segment`` runs: the plan's, split under the limit once it has been lowered."""
        if segment not in self.layouts:
            seg = self.plan.segments[segment]
            lowered = self.limit < self.plan.tile_limit and self.plan._est is not None
            self.layouts[segment] = self._split(seg, seg.layout, self.limit) if lowered else seg.layout
        return self.layouts[segment]

    def shrink(self, segment: int, tile: int, restart: bool = False) -> Layout:
        """After tile ``tile`` of ``segment`` ran out of memory: the segment's new layout, the tiles
        before ``tile`` (already written) unchanged; with ``restart``, every segment is laid out again
        when it next runs (the run starts over)."""
        seg, layout = self.plan.segments[segment], self.layout(segment)
        core = layout[tile]
        est = self.plan._est
        peak = est.tile(seg.start, seg.stop, core)[0] if est is not None else None
        limit = min(self.limit, peak) // 2 if peak is not None else 0
        if est is None or len(self._split(seg, (core,), limit)) == 1:
            raise self._exhausted(segment, core, peak)
        self.limit = limit
        if restart:
            self.layouts.clear()
            new = self._split(seg, seg.layout, limit)
        else:
            new = self.layouts[segment] = layout[:tile] + self._split(seg, layout[tile:], limit)
        biggest = max(new[tile:] if not restart else new, key=lambda r: r.area)
        warnings.warn(
            f"out of memory in segment {segment} ({_names(seg)}) at a tile of {core.h}x{core.w} px of its "
            f"{_wxh(seg.size_out)} output (estimated {fmt_bytes(peak)}): "
            + ("its causal caches carry over from earlier time windows, so the run starts again with every "
               "segment's tiles " if restart else "splitting it and the segment's remaining tiles, and the tiles of "
               "later segments, ")
            + f"under a tile limit of {fmt_bytes(limit)} (tiles of at most {biggest.h}x{biggest.w} px here)",
            RuntimeWarning, stacklevel=2,
        )
        return new

    def _split(self, seg: Segment, cores: Sequence[Region], limit: int) -> Layout:
        """``cores`` of ``seg``, each split as a quadtree until every tile's estimated peak fits ``limit``."""
        est = self.plan._est
        align = est.align(seg.stop)
        return tuple(t for core in cores
                     for t in subdivide(core, lambda r: est.tile(seg.start, seg.stop, r)[0] <= limit, align))

    def _exhausted(self, segment: int, core: Region, peak: int | None) -> OutOfMemoryError:
        """The error once the failing tile cannot be split: it names the smallest plan tried."""
        seg = self.plan.segments[segment]
        smallest = replace(self.plan.with_layouts(self.layouts), tile_limit=self.limit)
        return OutOfMemoryError(
            f"out of memory in segment {segment} ({_names(seg)}) even at the smallest tile the model allows there: "
            f"{core.h}x{core.w} px of its {_wxh(seg.size_out)} output, estimated {fmt_bytes(peak)}. The smallest "
            f"plan tried has {smallest.tiles} tiles under a tile limit of {fmt_bytes(smallest.tile_limit)} "
            f"(estimated peak {fmt_bytes(smallest.peak)}; the error's .plan.describe() shows it). Free memory on "
            "the device, or give a smaller batch or input",
            plan=smallest,
        )


def _names(seg: Segment) -> str:
    return seg.names[0] if len(seg.names) == 1 else f"{seg.names[0]} .. {seg.names[-1]}"
