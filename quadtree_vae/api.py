"""The public functions: ``encode``, ``decode``, ``encode_moments`` and ``plan``.

Each builds an :class:`~quadtree_vae.options.Options` (which checks the options) and hands it to
:func:`run_tiled` / :func:`plan_for`, which check the model and the tensor before any heavy work:
the model family, the tensor's rank, channels, size, frame count and values. What a shape must be
comes from the model's adapter (:func:`quadtree_vae.adapters.facts`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from . import adapters, distributed
from .adapters.common import Facts
from .engine import Network, Run, execute
from .errors import InvalidInputError, NonFiniteOutputError, UnsupportedArchitectureError
from .fitting import fit_frames, frames_to_add
from .norm import Moments
from .options import Options, Progress, parse_device, parse_shape
from .planner import Plan, Replanner, fmt_bytes, make_plan

OPS = ("encode", "decode")


def encode(
    vae: nn.Module,
    x: torch.Tensor,
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    *,
    frames: str = "error",
    fallback: str = "error",
    output_device: torch.device | str | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    group: object = None,
) -> torch.Tensor | None:
    """Tiled ``vae.encode(x).latent_dist.mode()``.

    ``x`` is (B, 3, H, W), or (B, 3, T, H, W) for the video VAEs, in [-1, 1]. ``tile`` (int or
    (h, w), image pixels) is the largest region a block runs on at image resolution, halo included,
    and so sets the memory of a tile; ``budget`` (bytes or "4GB") caps device memory; neither: the
    device's free memory. ``frames`` says what to do with a video whose frame count the model does
    not take (1 + 4k for Wan 2.1): "error", "trim" the extra frames, or "pad" by repeating the last
    frame. ``fallback="full"`` runs the model's own untiled path, with a warning, for a model the
    engine does not support.

    ``group``: a torch.distributed ProcessGroup (``torch.distributed.group.WORLD``: all ranks) whose
    ranks all make this same call with the same model and input and split each segment's tiles
    between them; every rank gets the result. ``quadtree_vae.Ranks(group, dst=0)``: only rank
    ``dst`` gets it (the others get None), and it counts the bytes moved. The default None runs in
    this process alone, also when torch.distributed is initialised (data-parallel code encodes a
    different input on each rank).
    """
    opts = Options(tile, budget, mode, frames, fallback, output_device, progress, plan, group)
    return run_tiled("encode", vae, x, opts)


def decode(
    vae: nn.Module,
    z: torch.Tensor,
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    *,
    fallback: str = "error",
    output_device: torch.device | str | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    group: object = None,
) -> torch.Tensor | None:
    """Tiled ``vae.decode(z).sample``: ``z`` is (B, C, h, w), or (B, C, T, h, w) for the video VAEs.
    Options as for :func:`encode` (``group``: tile-parallel over a process group)."""
    opts = Options(tile, budget, mode, fallback=fallback, output_device=output_device, progress=progress, plan=plan,
                   group=group)
    return run_tiled("decode", vae, z, opts)


def encode_moments(
    vae: nn.Module,
    x: torch.Tensor,
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    **options,
) -> torch.Tensor:
    """Tiled ``vae.encode(x).latent_dist.parameters``: mean and log-variance (2C channels), for
    callers that need the whole posterior (``DiagonalGaussianDistribution``), e.g. to sample it.
    Takes the keyword options of :func:`encode`."""
    return run_tiled("encode", vae, x, Options(tile, budget, mode, **options), moments=True)


def plan(
    vae: nn.Module,
    shape: Sequence[int],
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    *,
    op: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Plan:
    """The tile plan for encoding (``op="encode"``) or decoding an input of ``shape``.

    ``op`` may be left out when the channel count tells (image channels: encode; latent: decode).
    """
    return plan_for(vae, shape, Options(tile, budget, mode), op=op, dtype=dtype, device=device)


def plan_for(
    vae: nn.Module,
    shape: Sequence[int],
    opts: Options,
    *,
    op: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Plan:
    """:func:`plan` with options already made (the front ends' entry)."""
    family = adapters.adapter_for(vae)
    facts = family.facts(vae)
    shape = parse_shape(shape)
    op = _check_op(op, facts, shape)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidInputError(f"dtype must be a floating-point torch.dtype, not {dtype!r}")
    shape5 = _check_shape(facts, op, shape)
    if op == "encode" and facts.temporal and opts.frames != "error":  # plan for the clip as fitted
        added = frames_to_add(facts, shape5[2], opts.frames, f"{facts.name} encode")
        shape5 = (*shape5[:2], shape5[2] + added, *shape5[3:])
    dev = parse_device(device, here=opts.budget is None) if device is not None else _device(vae)
    net = _network(family, vae, op, opts.mode)
    return _plan(net, facts, op, shape5, opts, dev, dtype or _dtype(vae))


# ------------------------------------------------------------------------------------------ checks


def _check_op(op: str | None, facts: Facts, shape: tuple[int, ...]) -> str:
    if op is None:
        c = shape[1] if len(shape) > 1 else None
        ins, lat = facts.in_channels, facts.latent_channels
        if c not in (ins, lat) or ins == lat:
            raise InvalidInputError(f"cannot tell encode from decode for shape {shape}: pass op='encode' or 'decode'")
        return "encode" if c == ins else "decode"
    if op not in OPS:
        raise InvalidInputError(f"op must be 'encode' or 'decode', not {op!r}")
    return op


def _check_shape(facts: Facts, op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Validate an input shape; returns it with a time axis for the video models."""
    temporal = facts.temporal
    name = facts.name
    ranks = (4, 5) if temporal else (4,)
    what = ("an image/video" if temporal else "an image") if op == "encode" else "a latent"
    if len(shape) not in ranks:
        want = "(B, C, H, W) or (B, C, T, H, W)" if temporal else "(B, C, H, W)"
        raise InvalidInputError(f"{name} {op}: expected {what} tensor {want}, got shape {shape}")
    if 0 in shape:
        raise InvalidInputError(f"{name} {op}: the input tensor is empty (shape {shape})")
    channels = facts.in_channels if op == "encode" else facts.latent_channels
    if shape[1] != channels:
        raise InvalidInputError(f"{name} {op}: expected {channels} channels, got {shape[1]} (shape {shape})")
    if op == "encode":
        h, w = shape[-2:]
        f = facts.spatial_factor
        if h % f or w % f:
            raise InvalidInputError(f"{name} encode: height and width must be multiples of {f}, got {h}x{w}")
    if temporal and len(shape) == 4:
        shape = (shape[0], shape[1], 1, *shape[2:])
    return shape


def _check_tensor(facts: Facts, op: str, x: object) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{facts.name} {op}: expected a torch.Tensor, got {type(x).__name__}")
    shape5 = _check_shape(facts, op, tuple(x.shape))
    if not x.is_floating_point():
        raise InvalidInputError(f"{facts.name} {op}: expected a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError(f"{facts.name} {op}: the input contains NaN or Inf values")
    return shape5


def check_budget(plan_: Plan) -> None:
    """Refuse to run a plan whose estimated peak exceeds its budget, saying why it cannot be met.

    :func:`run_tiled` and the command line call this before any work on the plans they make.
    :func:`plan` still returns such a plan, for inspection (its ``describe()`` says it exceeds the
    budget); one passed back with ``plan=`` runs as the caller chose, with a warning.
    """
    if plan_.budget is None or plan_.peak <= plan_.budget:
        return
    i, seg = max(enumerate(plan_.segments), key=lambda pair: pair[1].peak)
    names = seg.names[0] if len(seg.names) == 1 else f"{seg.names[0]} .. {seg.names[-1]}"
    what = (f"segment {i} ({names}) needs the whole frame at once ({fmt_bytes(seg.peak)})" if seg.is_global else
            f"the smallest tiles of segment {i} ({names}) need {fmt_bytes(seg.peak)}")
    held = (f", on top of the {fmt_bytes(plan_.cut_bytes)} of tensors held between segments on the device"
            if plan_.park == "device" else "")
    raise InvalidInputError(
        f"the memory budget {fmt_bytes(plan_.budget)} cannot be met for {plan_.op} of {plan_.in_shape}: {what}{held}, "
        f"an estimated peak of {fmt_bytes(plan_.peak)}. Raise the budget to at least {fmt_bytes(plan_.peak)} "
        "or give a smaller input"
    )


def _device(vae: nn.Module) -> torch.device:
    p = next(vae.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(vae: nn.Module) -> torch.dtype:
    p = next(vae.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _plan(net: Network, facts: Facts, op: str, shape5, opts: Options, device, dtype) -> Plan:
    f = facts.spatial_factor
    tile = None if opts.tile is None else (opts.tile[0] // f * f, opts.tile[1] // f * f)
    return make_plan(net, op, shape5, tile=tile, budget=opts.budget, device=device, dtype=dtype, mode=opts.mode)


def _network(family, vae: nn.Module, op: str, mode: str, moments: bool = False) -> Network:
    return family.encoder(vae, mode, moments) if op == "encode" else family.decoder(vae, mode)


# --------------------------------------------------------------------------------------------- run


def _untiled(vae: nn.Module, op: str, x: torch.Tensor, moments: bool = False) -> torch.Tensor:
    if op == "decode":
        return vae.decode(x).sample
    dist = vae.encode(x).latent_dist
    return dist.parameters if moments else dist.mode()


@contextlib.contextmanager
def _upcast(vae: nn.Module) -> Iterator[torch.dtype]:
    """Run a float16 VAE whose config asks for ``force_upcast`` in float32, as diffusers pipelines do.

    This casts the model's own weights for the duration of the call (and back after), so a model
    with ``force_upcast`` must not be used by two threads at once; diffusers' pipelines do the same
    cast on the same shared model. Every other model is only read, and may be shared freely.
    """
    dtype = _dtype(vae)
    if dtype == torch.float16 and getattr(vae, "config", {}).get("force_upcast", False):
        nn.Module.to(vae, torch.float32)  # diffusers' own .to() logs a spurious warning on dtype casts
        try:
            yield torch.float32
        finally:
            nn.Module.to(vae, dtype)
    else:
        yield dtype


def run_tiled(op: str, vae: nn.Module, x: torch.Tensor, opts: Options, moments: bool = False) -> torch.Tensor | None:
    """Encode (the posterior's mode, or its ``moments``) or decode ``x`` tile by tile, as ``opts`` say."""
    if op not in OPS:
        raise InvalidInputError(f"op must be 'encode' or 'decode', not {op!r}")
    try:
        family = adapters.adapter_for(vae)
    except UnsupportedArchitectureError as e:
        if opts.fallback != "full":
            raise
        warnings.warn(f"{e}; running the model's own untiled {op} instead", stacklevel=3)
        with torch.no_grad():
            return _untiled(vae, op, x, moments)
    facts = family.facts(vae)
    shape5 = _check_tensor(facts, op, x)
    squeeze = len(shape5) != x.dim()
    if squeeze:
        x = x.unsqueeze(2)
    if op == "encode" and facts.temporal:
        x = fit_frames(x, frames_to_add(facts, x.shape[2], opts.frames, f"{facts.name} encode"))
    out_device = opts.output_device if opts.output_device is not None else x.device
    plan_ = opts.plan
    if plan_ is not None and (plan_.op != op or plan_.in_shape != tuple(x.shape) or plan_.mode != opts.mode):
        raise InvalidInputError(
            f"the plan was made for {plan_.op} of {plan_.in_shape} in {plan_.mode} mode, "
            f"not {op} of {tuple(x.shape)} in {opts.mode} mode"
        )

    with torch.no_grad(), _upcast(vae) as dtype:
        device = _device(vae)
        net = _network(family, vae, op, opts.mode, moments)
        if plan_ is None:
            plan_ = _plan(net, facts, op, tuple(x.shape), opts, device, dtype)
            check_budget(plan_)
        elif plan_.budget and plan_.peak > plan_.budget:
            warnings.warn(f"the plan's estimated peak {fmt_bytes(plan_.peak)} exceeds its budget "
                          f"{fmt_bytes(plan_.budget)}; running it as given", stacklevel=3)
        if opts.group is not None:  # distributed: one plan for all ranks, split so each has tiles
            plan_ = distributed.agree(plan_, opts.group)
        fixed = _fast_stats(vae, net, op, x.to(dtype), plan_) if opts.mode == "fast" else {}
        tick = _ticker(plan_, net, x.shape[2] if net.temporal else 1, opts.progress, opts.group)
        run = _run_of(plan_, device, out_device, tick, opts.group, fixed)
        y = execute(net, plan_.segments, x.to(dtype), run)
    if y is None:  # distributed, and the result went to another rank (Ranks.dst)
        return None
    if not bool(torch.isfinite(y).all()):
        raise NonFiniteOutputError(
            f"{facts.name} {op} produced NaN/Inf values in {dtype}: the VAE overflowed. Run it in float32 or "
            "bfloat16, or use an fp16-safe VAE (for SDXL: madebyollin/sdxl-vae-fp16-fix)."
        )
    return y.squeeze(2) if squeeze else y


def _run_of(plan_: Plan, device: torch.device, output: torch.device, tick: Callable[[], None], ranks=None,
            fixed: dict | None = None) -> Run:
    """The engine's run settings for ``plan_``: where tensors and caches wait, the group if any."""
    park = device if plan_.park == "device" else torch.device("cpu")
    caches = device if plan_.cache_at == "device" else torch.device("cpu")
    retile = Replanner(plan_) if ranks is None else None  # ranks share one layout: no replanning
    return Run(device, park, output, fixed or {}, tick, ranks=ranks, caches=caches, retile=retile)


def _ticker(plan_: Plan, net: Network, t: int, progress: Progress | None, ranks=None) -> Callable[[], None]:
    """Counts this process's tiles x chunks (with ``ranks``: this rank's share), up to the planned total."""
    if progress is None:
        return lambda: None
    chunks = len(net.chunks(t)) if net.temporal else 1
    total = sum(1 if s.is_global else len(distributed.share(s.layout, ranks)) for s in plan_.segments) * chunks
    done = 0
    progress(0, total)

    def tick() -> None:
        nonlocal done
        done += 1
        progress(min(done, total), total)  # tiles split after running out of memory tick more than planned

    return tick


# ------------------------------------------------------------------------------------- fast mode


def _fast_stats(vae: nn.Module, net: Network, op: str, x: torch.Tensor, plan_: Plan) -> dict[int, Moments]:
    """GroupNorm statistics estimated from one untiled pass over a subsampled input.

    The input keeps every f-th pixel, f the largest power of two that leaves the image's long side
    at least 256 px: subsampling (unlike averaging) keeps the distribution of the values, whose
    moments are what GroupNorm needs; the pass costs about 1/f^2 of the whole.
    """
    norms = {id(s.norm): i for i, s in enumerate(net.steps) if s.norm is not None}
    if not norms:
        return {}
    image = max((s for seg in plan_.segments for s in (seg.size_in, seg.size_out)), key=lambda s: s[0] * s[1])
    factor = 2 ** max(0, int(math.log2(max(image) / 256))) if max(image) > 256 else 1
    small = x[..., ::factor, ::factor]
    if op == "encode":  # the encoder takes sides that are multiples of its factor
        unit = net.spatial_factor
        small = small[..., : max(unit, small.shape[-2] // unit * unit), : max(unit, small.shape[-1] // unit * unit)]
    found: dict[int, Moments] = {}
    hooks = []

    def grab(module: nn.Module, args: tuple) -> None:
        found[norms[id(module)]] = Moments.of(args[0], module.num_groups)

    try:
        for s in net.steps:
            if s.norm is not None:
                hooks.append(s.norm.register_forward_pre_hook(grab))
        _untiled(vae, op, small.contiguous())
    finally:
        for h in hooks:
            h.remove()
    return found
