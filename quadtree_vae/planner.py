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

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import partial

import torch

from .engine import Network
from .errors import InvalidInputError
from .geometry import Layout, Region, check_layout, full, halo_regions, produced, quadtree, sizes_along

MIN_TILE = 16  # px on the image side: two latent pixels; below it the halo is most of the work
CACHE_T = 2  # frames a causal 3x3x3 conv keeps between chunks


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
    cut_bytes: int  # largest set of tensors alive between segments
    _relayout: Callable[[Segment, Layout], Segment] | None = field(default=None, repr=False, compare=False)

    @property
    def peak(self) -> int:
        """Estimated device bytes at the worst moment (largest tile, plus waiting tensors if parked there)."""
        tiles = max(s.peak for s in self.segments)
        return tiles + (self.cut_bytes if self.park == "device" else 0)

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
            segs[i] = self._relayout(seg, layout) if self._relayout else replace(seg, layout=layout)
        return replace(self, segments=tuple(segs))

    def describe(self) -> str:
        """A human-readable table of the plan."""
        lines = [
            f"{self.op} with {self.network}: {tuple(self.in_shape)} -> {tuple(self.out_shape)}, mode={self.mode}",
            f"tile limit {fmt_bytes(self.tile_limit)}, budget {fmt_bytes(self.budget) if self.budget else 'none'}, "
            f"tensors between segments on {self.park} ({fmt_bytes(self.cut_bytes)}), "
            f"estimated peak {fmt_bytes(self.peak)}, work {self.overhead:.3f}x untiled",
            *([f"estimated peak exceeds the budget by {fmt_bytes(self.peak - self.budget)}: running this plan "
               "is refused"] if self.budget and self.peak > self.budget else []),
            f"{'#':>3} {'steps':<34} {'in':>11} {'out':>11} {'tiles':>5} {'halo':>4} {'peak':>9} {'work':>6}",
        ]
        for i, s in enumerate(self.segments):
            names = s.names[0] if len(s.names) == 1 else f"{s.names[0]} .. {s.names[-1]}"
            lines.append(
                f"{i:>3} {names[:34]:<34} {_wxh(s.size_in):>11} {_wxh(s.size_out):>11} "
                f"{'all' if s.is_global else len(s.layout):>5} {s.halo:>4} {fmt_bytes(s.peak):>9} "
                f"{s.work / max(1.0, s.work_untiled):>5.2f}x"
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
        live, cache, work = 0, 0, 0.0
        for k, step in enumerate(steps):
            c_in, c_out = step.channels
            f_in, f_out = self.frames.largest[start + k], self.frames.largest[start + k + 1]
            pad = CACHE_T if step.cache_slots else 0
            a_in, a_out = regions[k].area, produced(step.footprint, regions[k]).area
            x_in, x_out = c_in * a_in * (f_in + pad), c_out * a_out * f_out
            live = max(live, x_in + x_out + step.temporaries * max(x_in, x_out))
            cache += step.cache_slots * c_in * a_in * CACHE_T
            work += step.work * a_out * self.frames.total[start + k + 1]
        first = regions[0]
        ratio_y = self.sizes[start][0] / max(1, self.sizes[stop][0])
        ratio_x = self.sizes[start][1] / max(1, self.sizes[stop][1])
        halo = max(
            round(core.y[0] * ratio_y) - first.y[0], first.y[1] - round(core.y[1] * ratio_y),
            round(core.x[0] * ratio_x) - first.x[0], first.x[1] - round(core.x[1] * ratio_x), 0,
        )
        return int((live + cache) * self.batch * self.elem), work * self.batch, halo

    def image_extent(self, start: int, stop: int, core: Region, image: tuple[int, int]) -> tuple[int, int]:
        """Largest height and width of the regions a tile runs on at image resolution (halo included)."""
        regions = halo_regions([s.footprint for s in self.net.steps[start:stop]], core, self.sizes[start])
        at_image = [r for k, r in enumerate(regions) if self.sizes[start + k] == image] or [core]
        return max(r.h for r in at_image), max(r.w for r in at_image)

    def segment(self, start: int, stop: int, layout: Layout, is_global: bool) -> Segment:
        peaks, works, halos = zip(*(self.tile(start, stop, core) for core in layout))
        untiled = self.tile(start, stop, full(*self.sizes[stop]))[1]
        return Segment(
            start, stop, tuple(s.name for s in self.net.steps[start:stop]), is_global,
            self.sizes[start], self.sizes[stop], layout, max(peaks), sum(works), untiled, max(halos),
        )

    def frame_bytes(self, i: int) -> int:
        """Bytes of the whole tensor at the input of step ``i`` (all frames)."""
        c = self.net.steps[i].channels[0] if i < len(self.net.steps) else self.net.steps[-1].channels[1]
        h, w = self.sizes[i]
        return c * h * w * self.frames.total[i] * self.batch * self.elem


# ---------------------------------------------------------------------------------------- planning


def cut_points(net: Network, mode: str) -> list[int]:
    """Step indices where a segment starts."""
    steps = net.steps
    sizes = sizes_along([s.footprint for s in steps], (1024, 1024))
    cuts = {0}
    for i, s in enumerate(steps):
        if s.is_global:
            cuts |= {i, i + 1}
        if s.norm is not None and mode == "exact":
            cuts.add(i)
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
    """Plan ``op`` of an input of ``shape`` (B, C, [T,] H, W) through ``net``."""
    batch, h, w = shape[0], shape[-2], shape[-1]
    frames = _frames(net, shape[2] if net.temporal else 1)
    elem = torch.finfo(dtype).bits // 8
    sizes = sizes_along([s.footprint for s in net.steps], (h, w))
    est = _Estimator(net, frames, sizes, batch, elem)
    image = max(sizes, key=lambda s: s[0] * s[1])
    bounds = cut_points(net, mode) + [len(net.steps)]
    spans = list(zip(bounds, bounds[1:]))

    cut_bytes = max(
        est.frame_bytes(a) + (est.frame_bytes(b) if b < len(net.steps) else 0) for a, b in spans
    )
    probes = {} if tile is None else {
        (a, b): _probe(net, est, a, b, image, tile, frames, batch, elem)
        for a, b in spans
        if not net.steps[a].is_global and image in (sizes[a], sizes[b])
    }
    limit = max((peak for _, peak in probes.values()), default=None)
    if budget is not None or tile is None:
        total = budget if budget is not None else int(0.9 * available_memory(device))
        park = "device" if device.type == "cpu" or cut_bytes <= total // 2 else "cpu"
        room = total - (cut_bytes if park == "device" else 0)
        limit = room if limit is None else min(limit, room)
    else:
        park = "cpu" if device.type == "cuda" else "device"
    if limit is None or limit <= 0:
        given = fmt_bytes(budget) if budget is not None else \
            f"90% of the free memory on {device.type} ({fmt_bytes(int(0.9 * available_memory(device)))})"
        raise InvalidInputError(
            f"memory budget too small: {given} leaves no room for tiles once the "
            f"{fmt_bytes(cut_bytes)} of tensors between segments are held"
        )

    segments = []
    for a, b in spans:
        is_global = net.steps[a].is_global
        size = sizes[b]
        if is_global:
            layout: Layout = (full(*size),)
        else:
            align = max(1, net.spatial_factor * size[0] // image[0])
            cap = probes[(a, b)][0] if (a, b) in probes else None

            def fits(r: Region, a=a, b=b, capped=cap is not None) -> bool:
                if capped:
                    eh, ew = est.image_extent(a, b, r, image)
                    if eh > tile[0] or ew > tile[1]:
                        return False
                return est.tile(a, b, r)[0] <= limit

            layout = quadtree(*size, fits, align=align, cap=cap)
        segments.append(est.segment(a, b, layout, is_global))

    out_c = net.steps[-1].channels[1]
    out_shape = (batch, out_c, frames.total[-1], *sizes[-1]) if net.temporal else (batch, out_c, *sizes[-1])
    model_free = _Estimator(_shapes_only(net), frames, sizes, batch, elem)
    return Plan(
        op, net.name, tuple(shape), out_shape, mode, tuple(segments), int(limit), budget, park, cut_bytes,
        _relayout=partial(_relayout, model_free),
    )


def _shapes_only(net: Network) -> Network:
    """``net`` without the model: the steps keep their footprints, channels and costs but no
    modules, so a plan can re-estimate a segment without keeping the VAE alive, and pickles."""
    steps = [replace(s, fn=None, norm=None, join=None) for s in net.steps]
    return Network(net.name, steps, net.in_channels, None)


def _relayout(est: _Estimator, seg: Segment, layout: Layout) -> Segment:
    return est.segment(seg.start, seg.stop, layout, seg.is_global)


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
