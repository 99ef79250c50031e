"""Tile-parallel runs over torch.distributed: every rank runs a share of each segment's tiles.

All ranks of a group call ``encode``/``decode`` with the same model and input. They agree on one plan
(rank 0's layouts, split further so every rank has tiles: :func:`agree`). In a tiled segment a rank
runs only its share of the tiles (:func:`share`). After the segment, ranks exchange just the parts
of each other's cores that their own later tiles read, halos included (:func:`assemble`), so a rank
holds its share of what segments hold plus those strips; before a global step (attention at latent
resolution, which then runs replicated) and for the final output every core goes to every rank,
or only to ``dst``. GroupNorm moments are gathered in float64 and merged in rank order, so every
rank normalises with bit-identical statistics (:func:`all_reduce`). The collectives are
torch.distributed's own: NCCL, gloo, whatever the group runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .errors import InvalidInputError
from .geometry import Layout, Region, halo_regions, need
from .norm import Moments, merge_all

if TYPE_CHECKING:
    from .planner import Plan

SPLIT_BELOW = 4  # layouts with fewer than this many tiles per rank are split further for balance


@dataclass
class Ranks:
    """A process group that runs one encode/decode together, and what it moved.

    ``dst``: the group rank that alone receives the final result (the others get ``None``); None:
    every rank gets it. ``received`` / ``sent``: payload bytes this rank received from / sent to
    other ranks (a broadcast counts once per receiver), accumulated over the calls that use it.
    """

    group: Any = None  # a torch.distributed ProcessGroup; None: the default (world) group
    dst: int | None = None
    received: int = 0
    sent: int = 0

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def comm_device(self, compute: torch.device) -> torch.device:
        """Where tensors must be for the group's collectives: the GPU for NCCL, else the host."""
        backend = str(dist.get_backend(self.group))
        return compute if compute.type == "cuda" and "nccl" in backend else torch.device("cpu")


def ranks(group: Any) -> Ranks | None:
    """The :class:`Ranks` for the ``group=`` argument of ``encode``/``decode``; None: one process.

    ``group`` is None (one process, even under an initialised process group: data-parallel callers
    encode different inputs on each rank), a ProcessGroup (``torch.distributed.group.WORLD`` for
    all ranks) or a :class:`Ranks`. A group of one rank runs as a single process.
    """
    if group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidInputError("group= needs an initialised torch.distributed process group (init_process_group)")
    out = group if isinstance(group, Ranks) else Ranks(group)
    if not isinstance(out.group, (dist.ProcessGroup, type(None))):
        raise InvalidInputError(f"group must be a torch.distributed ProcessGroup or Ranks, not {type(group).__name__}")
    if out.dst is not None and not 0 <= out.dst < out.size:
        raise InvalidInputError(f"dst={out.dst} is not a rank of the group (size {out.size})")
    return out if out.size > 1 else None


# ------------------------------------------------------------------------------------------- plan


def agree(plan: Plan, ranks: Ranks) -> Plan:
    """Rank 0's plan, with layouts split so every rank gets a fair share of each segment's tiles.

    Plans from a memory budget may differ between ranks (free memory differs), so rank 0's layouts
    are used everywhere; the call also checks that all ranks run the same operation on the same
    shape, so a mismatch raises on every rank instead of hanging in a collective.
    """
    mine = (plan.op, plan.network, plan.in_shape, plan.mode)
    layouts = {i: s.layout for i, s in enumerate(plan.segments) if not s.is_global}
    everyone: list = [None] * ranks.size
    dist.all_gather_object(everyone, (mine, layouts if ranks.rank == 0 else None), group=ranks.group)
    if any(sig != mine for sig, _ in everyone):
        found = sorted({str(sig) for sig, _ in everyone})
        raise InvalidInputError(f"the ranks of the group run different calls: {found}")
    latent = min(min(s.size_in[0] for s in plan.segments), min(s.size_out[0] for s in plan.segments))
    latent_w = min(min(s.size_in[1] for s in plan.segments), min(s.size_out[1] for s in plan.segments))
    split = {}
    for i, layout in everyone[0][1].items():
        h, w = plan.segments[i].size_out
        split[i] = spread(layout, ranks.size, (max(1, h // latent), max(1, w // latent_w)))
    return plan.with_layouts(split)


def spread(layout: Layout, n: int, align: tuple[int, int] = (1, 1)) -> Layout:
    """``layout`` with each tile cut into strips along its long side, so ``n`` ranks share it evenly.

    A layout of at least ``SPLIT_BELOW * n`` tiles is kept (the busiest rank then has at most about
    1/SPLIT_BELOW of a tile more than the average); otherwise every tile is cut into ``k`` strips,
    ``k`` the smallest number that makes the tile count a multiple of ``n``. Cuts fall on
    multiples of ``align`` (latent pixels) where the strip is long enough.
    """
    if len(layout) >= SPLIT_BELOW * n:
        return tuple(layout)
    k = n // math.gcd(len(layout), n)
    return tuple(strip for tile in layout for strip in _strips(tile, k, align))


def _strips(tile: Region, k: int, align: tuple[int, int]) -> list[Region]:
    if tile.h >= tile.w:
        ys = [tile.y[0] + c for c in _cuts(tile.h, k, align[0])]
        return [Region((a, b), tile.x) for a, b in zip(ys, ys[1:])]
    xs = [tile.x[0] + c for c in _cuts(tile.w, k, align[1])]
    return [Region(tile.y, (a, b)) for a, b in zip(xs, xs[1:])]


def _cuts(n: int, k: int, align: int) -> list[int]:
    """Bounds of ``min(k, n)`` near-equal parts of ``[0, n)``, cut on multiples of ``align`` if that
    still gives that many parts."""
    k = min(k, n)
    for a in (align, 1):
        inner = {round(i * n / k / a) * a for i in range(1, k)}
        bounds = [0, *sorted(c for c in inner if 0 < c < n), n]
        if len(bounds) == k + 1:
            return bounds
    raise AssertionError("unreachable: with align 1, k <= n parts always exist")


def owners(layout: Layout, n: int) -> list[int]:
    """The rank that runs each tile: largest tiles first, each to the least loaded rank (by area).

    Deterministic, so every rank computes the same assignment; rank 0 always gets the largest tile.
    """
    load = [0] * n
    owner = [0] * len(layout)
    for i in sorted(range(len(layout)), key=lambda i: -layout[i].area):
        r = min(range(n), key=lambda r: load[r])
        owner[i] = r
        load[r] += layout[i].area
    return owner


def mine(layout: Layout, ranks: Ranks | None) -> list[int]:
    """Indices of the tiles of ``layout`` this rank runs, in layout order (all of them without a group)."""
    if ranks is None:
        return list(range(len(layout)))
    return [i for i, r in enumerate(owners(layout, ranks.size)) if r == ranks.rank]


def share(layout: Layout, ranks: Ranks | None) -> list[Region]:
    """The tiles of ``layout`` this rank runs, in layout order (all of them without a group)."""
    return [layout[i] for i in mine(layout, ranks)]


# ------------------------------------------------------------------------------------ exchange


def assemble(frames, steps, segments, i: int, ranks: Ranks, target: torch.device, compute: torch.device):
    """The engine's ``Frames`` of segment ``i``'s output, with what each rank reads later filled in.

    Between segments a rank gets, from the ranks that made them, only the parts of other ranks'
    cores that its own later tiles read (halo exchange, point to point: :func:`readers`); the
    rest of its tensor is never written (on the host such pages are never made resident). Before a
    global step, and for the final output, every core goes to every rank (or only to ``ranks.dst``
    for the final output; the other ranks then get ``tensor=None``). A rank that ran no tile of
    the segment first learns the output's shape from rank 0.
    """
    layout = segments[i].layout
    own = owners(layout, ranks.size)
    out, bounds = frames.tensor, frames.bounds
    if len(set(own)) < ranks.size:  # some rank ran no tile and has no output tensor yet
        meta = [None if out is None else (tuple(out.shape), out.dtype, bounds)]
        dist.broadcast_object_list(meta, src=ranks.global_rank(0), group=ranks.group)
        if out is None:
            shape, dtype, bounds = meta[0]
            out = torch.empty(shape, dtype=dtype, device=target)
    final = i == len(segments) - 1
    wanted = None if final else readers(steps, segments, i, ranks.size)
    if wanted is not None:
        _exchange(out, layout, own, wanted, ranks, ranks.comm_device(compute))
    else:
        out = _gather(out, layout, own, ranks, ranks.comm_device(compute), ranks.dst if final else None)
    return replace(frames, tensor=out, bounds=bounds)


def readers(steps, segments, i: int, n: int) -> list[list[Region]] | None:
    """For each of ``n`` ranks, the regions of segment ``i``'s output that its later tiles read.

    The next segment's tiles read it with their halos; if the next segment starts at a residual
    source, later segments' joins read it at their own regions (as the engine's ``kept`` frames).
    None: some global step reads all of it, so every rank needs all of it.
    """
    nxt = segments[i + 1]
    if nxt.is_global:
        return None
    wanted: list[list[Region]] = [[] for _ in range(n)]
    for j in range(i + 1, len(segments)):
        seg = segments[j]
        seg_steps = steps[seg.start : seg.stop]
        joins = [] if j == i + 1 else [(k + 1, s) for k, s in enumerate(seg_steps) if s.skip == nxt.start]
        if j != i + 1 and not joins:
            continue
        if seg.is_global:
            return None
        fps = [s.footprint for s in seg_steps]
        for core, r in zip(seg.layout, owners(seg.layout, n)):
            regions = halo_regions(fps, core, seg.size_in)
            if j == i + 1:
                wanted[r].append(regions[0])
            wanted[r].extend(need(s.skip_footprint, regions[k], nxt.size_in) for k, s in joins)
    return wanted


def _exchange(out: torch.Tensor, layout: Layout, own: list[int], wanted: list[list[Region]], ranks: Ranks,
              comm: torch.device) -> None:
    """Send each other rank the box of each of this rank's cores that it reads; receive likewise."""
    me, lead = ranks.rank, out.shape[:-2]
    ops, landing = [], []
    for tag, (core, owner) in enumerate(zip(layout, own)):
        for r in range(ranks.size):
            box = None if r == owner or me not in (r, owner) else _box(core, wanted[r])
            if box is None:
                continue
            if owner == me:
                piece = out[..., box.y[0] : box.y[1], box.x[0] : box.x[1]].contiguous().to(comm)
                ops.append(dist.P2POp(dist.isend, piece, ranks.global_rank(r), ranks.group, tag))
                ranks.sent += piece.nbytes
            else:
                piece = torch.empty((*lead, box.h, box.w), dtype=out.dtype, device=comm)
                ops.append(dist.P2POp(dist.irecv, piece, ranks.global_rank(owner), ranks.group, tag))
                landing.append((box, piece))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    for box, piece in landing:
        out[..., box.y[0] : box.y[1], box.x[0] : box.x[1]] = piece.to(out.device)
        ranks.received += piece.nbytes


def _box(core: Region, wanted: list[Region]) -> Region | None:
    """The bounding box of the parts of ``core`` that the ``wanted`` regions cover (None: none)."""
    parts = [
        ((max(core.y[0], w.y[0]), min(core.y[1], w.y[1])), (max(core.x[0], w.x[0]), min(core.x[1], w.x[1])))
        for w in wanted
    ]
    parts = [(y, x) for y, x in parts if y[0] < y[1] and x[0] < x[1]]
    if not parts:
        return None
    return Region((min(y[0] for y, _ in parts), max(y[1] for y, _ in parts)),
                  (min(x[0] for _, x in parts), max(x[1] for _, x in parts)))


def _gather(out: torch.Tensor, layout: Layout, own: list[int], ranks: Ranks, comm: torch.device,
            only: int | None) -> torch.Tensor | None:
    """Every core to every rank (each broadcast by its owner), or only to rank ``only``."""
    me, lead = ranks.rank, out.shape[:-2]
    for core, owner in zip(layout, own):
        if only is not None and owner == only:
            continue
        if owner == me:
            piece = out[..., core.y[0] : core.y[1], core.x[0] : core.x[1]].contiguous().to(comm)
        else:
            piece = torch.empty((*lead, core.h, core.w), dtype=out.dtype, device=comm)
        if only is None:
            dist.broadcast(piece, src=ranks.global_rank(owner), group=ranks.group)
        elif owner == me:
            dist.send(piece, dst=ranks.global_rank(only), group=ranks.group)
        elif me == only:
            dist.recv(piece, src=ranks.global_rank(owner), group=ranks.group)
        if owner == me:
            ranks.sent += piece.nbytes * (ranks.size - 1 if only is None else 1)
        elif only is None or me == only:
            ranks.received += piece.nbytes
            out[..., core.y[0] : core.y[1], core.x[0] : core.x[1]] = piece.to(out.device)
    return None if only is not None and me != only else out


def all_reduce(moments: Moments | None, groups: int, batch: int, ranks: Ranks, compute: torch.device) -> Moments:
    """Whole-frame moments from every rank's own (None: it ran no tile), merged in rank order.

    Count, mean and sum of squared deviations travel in float64; each rank merges all of them in
    the same order with Chan's formula, so all ranks hold bit-identical statistics.
    """
    comm = ranks.comm_device(compute)
    k = batch * groups
    mine = torch.zeros(1 + 2 * k, dtype=torch.float64, device=comm)
    if moments is not None:
        mine[0] = moments.n
        mine[1 : 1 + k] = moments.mean.reshape(-1).to(comm)
        mine[1 + k :] = moments.m2.reshape(-1).to(comm)
    everyone = [torch.empty_like(mine) for _ in range(ranks.size)]
    dist.all_gather(everyone, mine, group=ranks.group)
    ranks.received += mine.nbytes * (ranks.size - 1)
    ranks.sent += mine.nbytes * (ranks.size - 1)
    parts = [
        Moments(int(t[0].item()), t[1 : 1 + k].reshape(batch, groups).to(compute),
                t[1 + k :].reshape(batch, groups).to(compute))
        for t in everyone
        if t[0].item() > 0
    ]
    return merge_all(parts)
