"""Tile geometry as pure functions: intervals, footprints, regions and layouts.

Nothing here touches a model. A *footprint* says, along one spatial axis, which input interval a
block needs to compute an output interval exactly, and which output interval a given input
interval lands on. Composing footprints backwards over a chain of blocks gives each block's halo;
the engine crops to those regions after every block, so the tiled result equals the untiled one.
All intervals are half-open ``(start, stop)`` in the pixel grid of the tensor they index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Interval = tuple[int, int]


def clip(iv: Interval, n: int) -> Interval:
    """Intersect ``iv`` with ``[0, n)``: the frame border, where the model's own padding is right."""
    return max(0, iv[0]), min(n, iv[1])


@dataclass(frozen=True)
class Conv:
    """A convolution along one axis: kernel ``k``, stride ``s``, zero padding ``pad`` = (begin, end).

    ``pad`` is what the module itself adds on every call (including asymmetric pads like the
    ``(0, 1)`` of the stride-2 downsamplers), so it is applied at tile borders too; the halo makes
    those border outputs irrelevant unless the tile border is the frame border.
    """

    k: int
    s: int = 1
    pad: tuple[int, int] = (0, 0)

    def need(self, out: Interval, n_in: int) -> Interval:
        o0, o1 = out
        return clip((self.s * o0 - self.pad[0], self.s * (o1 - 1) - self.pad[0] + self.k), n_in)

    def produced(self, inp: Interval) -> Interval:
        i0, i1 = inp
        if i0 % self.s:
            raise ValueError(f"input interval {inp} is not aligned to stride {self.s}")
        return i0 // self.s, i0 // self.s + self.out_size(i1 - i0)

    def out_size(self, n_in: int) -> int:
        return (n_in + self.pad[0] + self.pad[1] - self.k) // self.s + 1

    @property
    def scale(self) -> tuple[int, int]:
        return 1, self.s


def same(radius: int) -> Conv:
    """A stride-1 'same' convolution of the given radius (radius 0 is pointwise)."""
    return Conv(2 * radius + 1, 1, (radius, radius))


POINTWISE = same(0)


@dataclass(frozen=True)
class Up:
    """Nearest-neighbour upsampling by an integer factor: output ``j`` reads input ``j // f``."""

    f: int

    def need(self, out: Interval, n_in: int) -> Interval:
        return clip((out[0] // self.f, (out[1] - 1) // self.f + 1), n_in)

    def produced(self, inp: Interval) -> Interval:
        return inp[0] * self.f, inp[1] * self.f

    def out_size(self, n_in: int) -> int:
        return n_in * self.f

    @property
    def scale(self) -> tuple[int, int]:
        return self.f, 1


@dataclass(frozen=True)
class Chain:
    """Footprints applied one after the other inside one block (no cropping in between)."""

    parts: tuple

    def need(self, out: Interval, n_in: int) -> Interval:
        sizes = [n_in]
        for p in self.parts[:-1]:
            sizes.append(p.out_size(sizes[-1]))
        for p, n in zip(reversed(self.parts), reversed(sizes)):
            out = p.need(out, n)
        return out

    def produced(self, inp: Interval) -> Interval:
        for p in self.parts:
            inp = p.produced(inp)
        return inp

    def out_size(self, n_in: int) -> int:
        for p in self.parts:
            n_in = p.out_size(n_in)
        return n_in

    @property
    def scale(self) -> tuple[int, int]:
        num, den = 1, 1
        for p in self.parts:
            a, b = p.scale
            num, den = num * a, den * b
        return num, den


def chain(*parts) -> Chain | Conv | Up:
    """Compose footprints, dropping pointwise parts."""
    kept = tuple(p for p in parts if p != POINTWISE)
    if not kept:
        return POINTWISE
    return kept[0] if len(kept) == 1 else Chain(kept)


@dataclass(frozen=True)
class Aligned:
    """A block that reads its input in whole ``cell`` x ``cell`` cells (a space-to-depth or average-pool
    shortcut next to a strided main path): the input it needs is widened outward to the cell grid."""

    inner: Conv | Up | Chain
    cell: int

    def need(self, out: Interval, n_in: int) -> Interval:
        i0, i1 = self.inner.need(out, n_in)
        return clip((i0 // self.cell * self.cell, -(-i1 // self.cell) * self.cell), n_in)

    def produced(self, inp: Interval) -> Interval:
        return self.inner.produced(inp)

    def out_size(self, n_in: int) -> int:
        return self.inner.out_size(n_in)

    @property
    def scale(self) -> tuple[int, int]:
        return self.inner.scale


Footprint = Conv | Up | Chain | Aligned


@dataclass(frozen=True)
class Region:
    """A rectangle of a feature map: rows ``y`` and columns ``x``, half-open."""

    y: Interval
    x: Interval

    @property
    def h(self) -> int:
        return self.y[1] - self.y[0]

    @property
    def w(self) -> int:
        return self.x[1] - self.x[0]

    @property
    def area(self) -> int:
        return self.h * self.w

    def within(self, outer: Region) -> tuple[slice, slice]:
        """Slices that cut this region out of a tensor that covers ``outer``."""
        inside_y = outer.y[0] <= self.y[0] <= self.y[1] <= outer.y[1]
        if not (inside_y and outer.x[0] <= self.x[0] <= self.x[1] <= outer.x[1]):
            raise ValueError(f"{self} is not inside {outer}")
        return (slice(self.y[0] - outer.y[0], self.y[1] - outer.y[0]),
                slice(self.x[0] - outer.x[0], self.x[1] - outer.x[0]))

    def slices(self) -> tuple[slice, slice]:
        return slice(*self.y), slice(*self.x)


def full(h: int, w: int) -> Region:
    return Region((0, h), (0, w))


def need(fp: Footprint, out: Region, size_in: tuple[int, int]) -> Region:
    """Input region a block needs to produce ``out`` exactly (clipped to the input frame)."""
    return Region(fp.need(out.y, size_in[0]), fp.need(out.x, size_in[1]))


def produced(fp: Footprint, inp: Region) -> Region:
    """Output region that a block's result covers when it runs on input region ``inp``."""
    return Region(fp.produced(inp.y), fp.produced(inp.x))


def out_size(fp: Footprint, size_in: tuple[int, int]) -> tuple[int, int]:
    return fp.out_size(size_in[0]), fp.out_size(size_in[1])


def sizes_along(fps: Sequence[Footprint], size_in: tuple[int, int]) -> list[tuple[int, int]]:
    """Frame size before the first block and after each block of a chain."""
    sizes = [size_in]
    for fp in fps:
        sizes.append(out_size(fp, sizes[-1]))
    return sizes


def halo_regions(fps: Sequence[Footprint], core: Region, size_in: tuple[int, int]) -> list[Region]:
    """Regions to keep before the first block and after each block so that ``core`` comes out exact.

    Walks the chain backwards from the wanted output ``core``: ``regions[i]`` is the input region
    of block ``i`` and ``regions[-1] == core``.
    """
    sizes = sizes_along(fps, size_in)
    regions = [core]
    for fp, n in zip(reversed(fps), reversed(sizes[:-1])):
        regions.append(need(fp, regions[-1], n))
    return regions[::-1]


# ----------------------------------------------------------------------------------------- layouts

Layout = tuple[Region, ...]


def check_layout(layout: Sequence[Region], h: int, w: int) -> None:
    """Raise unless the tiles are non-empty, inside the frame and cover it exactly once."""
    for r in layout:
        if not (0 <= r.y[0] < r.y[1] <= h and 0 <= r.x[0] < r.x[1] <= w):
            raise ValueError(f"tile {r} is empty or outside the {h}x{w} frame")
    ys = sorted({0, h} | {v for r in layout for v in r.y})
    xs = sorted({0, w} | {v for r in layout for v in r.x})
    iy, ix = {v: i for i, v in enumerate(ys)}, {v: i for i, v in enumerate(xs)}
    count = [[0] * (len(xs) - 1) for _ in ys[1:]]
    for r in layout:
        for row in count[iy[r.y[0]] : iy[r.y[1]]]:
            for j in range(ix[r.x[0]], ix[r.x[1]]):
                row[j] += 1
    for i, row in enumerate(count):
        for j, n in enumerate(row):
            if n != 1:
                raise ValueError(f"cell y={ys[i]}:{ys[i + 1]} x={xs[j]}:{xs[j + 1]} is covered {n} times")


def grid(h: int, w: int, ys: Sequence[int] = (), xs: Sequence[int] = ()) -> Layout:
    """Tiles of a grid cut at rows ``ys`` and columns ``xs`` (interior positions, any order)."""
    yb = [0, *sorted(set(ys) - {0, h}), h]
    xb = [0, *sorted(set(xs) - {0, w}), w]
    return tuple(Region((y0, y1), (x0, x1)) for y0, y1 in zip(yb, yb[1:]) for x0, x1 in zip(xb, xb[1:]))


def _split(n: int, align: int) -> int:
    """Where to halve an interval of length ``n``: near the middle, on a multiple of ``align``."""
    cut = -(-n // (2 * align)) * align
    return cut if 0 < cut < n else n // 2


def even_cuts(n: int, cap: int, align: int = 1) -> list[int]:
    """Interior cut positions splitting ``n`` into the fewest near-equal parts no longer than ``cap``
    (cuts on multiples of ``align``, as long as that keeps every part within the cap)."""
    parts = -(-n // max(1, cap))
    while True:
        cuts = sorted({round(i * n / parts / align) * align for i in range(1, parts)} - {0, n})
        bounds = [0, *[c for c in cuts if 0 < c < n], n]
        if all(b - a <= cap for a, b in zip(bounds, bounds[1:])) or align == 1:
            return bounds[1:-1]
        align = 1 if parts > n else align
        parts += 1


def subdivide(r: Region, fits: Callable[[Region], bool], align: int = 1) -> list[Region]:
    """Split ``r`` as a quadtree until every leaf ``fits`` (or is ``align`` pixels on a side).

    A leaf is halved along both axes, or only along its long axis when it is more than twice as
    long as it is wide, so strips stay strips. Cuts fall on multiples of ``align`` where possible.
    """
    if fits(r):
        return [r]
    split_y = r.h >= 2 * align and r.h * 2 > r.w
    split_x = r.w >= 2 * align and r.w * 2 > r.h
    if not (split_y or split_x):
        split_y, split_x = r.h >= 2 * align, r.w >= 2 * align
        if not (split_y or split_x):
            return [r]
    ys = [r.y[0], r.y[0] + _split(r.h, align), r.y[1]] if split_y else [r.y[0], r.y[1]]
    xs = [r.x[0], r.x[0] + _split(r.w, align), r.x[1]] if split_x else [r.x[0], r.x[1]]
    return [t for y0, y1 in zip(ys, ys[1:]) for x0, x1 in zip(xs, xs[1:])
            for t in subdivide(Region((y0, y1), (x0, x1)), fits, align)]


def quadtree(
    h: int, w: int, fits: Callable[[Region], bool], align: int = 1, cap: tuple[int, int] | None = None
) -> Layout:
    """Split the frame as a quadtree until every leaf ``fits`` (see :func:`subdivide`).

    With ``cap`` the root is first split into the fewest near-equal cells no larger than the cap
    (a tile size asked for by the user).
    """
    roots = grid(h, w, even_cuts(h, cap[0], align), even_cuts(w, cap[1], align)) if cap else (full(h, w),)
    return tuple(t for root in roots for t in subdivide(root, fits, align))
