"""The public functions: ``encode``, ``decode`` and ``plan``.

Everything a caller can get wrong is checked here, before any heavy work: the model family, the
tensor's rank, channels, size, frame count and values, the tile and the budget.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch
from torch import nn

from . import adapters
from .engine import Network, Run, execute
from .errors import InvalidInputError, NonFiniteOutputError, UnsupportedArchitectureError
from .norm import Moments
from .planner import MIN_TILE, Plan, make_plan, parse_bytes

Progress = Callable[[int, int], None]
MODES = ("exact", "fast")
FRAMES = ("error", "trim", "pad")
FALLBACKS = ("error", "full")


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
) -> torch.Tensor:
    """Tiled ``vae.encode(x).latent_dist.mode()``.

    ``x`` is (B, 3, H, W), or (B, 3, T, H, W) for the Wan/Qwen-Image VAEs, in [-1, 1]. ``tile`` (int
    or (h, w), image pixels) is the largest region a block runs on at image resolution, halo
    included, and so sets the memory of a tile; ``budget`` (bytes or "4GB") caps device memory;
    neither: the device's free memory. ``frames`` says what to do with a video whose frame count is not 1 + 4k
    ("error", "trim" the extra frames, or "pad" by repeating the last frame). ``fallback="full"``
    runs the model's own untiled path, with a warning, for a model the engine does not support.
    """
    return _run("encode", vae, x, tile, budget, mode, frames, fallback, output_device, progress, plan)


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
) -> torch.Tensor:
    """Tiled ``vae.decode(z).sample``: ``z`` is (B, C, h, w) or (B, C, T, h, w) for the Wan/Qwen-Image VAEs."""
    return _run("decode", vae, z, tile, budget, mode, "error", fallback, output_device, progress, plan)


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
    opts = {"frames": "error", "fallback": "error", "output_device": None, "progress": None, "plan": None}
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"unexpected options {sorted(unknown)}")
    opts.update(options)
    return _run("encode", vae, x, tile, budget, mode, opts["frames"], opts["fallback"], opts["output_device"],
                opts["progress"], opts["plan"], moments=True)


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
    family = adapters.adapter_for(vae)
    shape = tuple(int(s) for s in shape)
    if op is None:
        c = shape[1] if len(shape) > 1 else None
        ins, lat = family.in_channels(vae), family.latent_channels(vae)
        if c not in (ins, lat) or ins == lat:
            raise InvalidInputError(f"cannot tell encode from decode for shape {shape}: pass op='encode' or 'decode'")
        op = "encode" if c == ins else "decode"
    _check_options(op, mode, "error", "error")
    shape5 = _check_shape(family, vae, op, shape)
    dev = torch.device(device) if device is not None else _device(vae)
    return _plan(_network(family, vae, op, mode), op, shape5, tile, budget, mode, dev, dtype or _dtype(vae))


# ------------------------------------------------------------------------------------------ checks


def _check_options(op: str, mode: str, frames: str, fallback: str) -> None:
    if op not in ("encode", "decode"):
        raise InvalidInputError(f"op must be 'encode' or 'decode', not {op!r}")
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, not {mode!r}")
    if frames not in FRAMES:
        raise InvalidInputError(f"frames must be one of {FRAMES}, not {frames!r}")
    if fallback not in FALLBACKS:
        raise InvalidInputError(f"fallback must be one of {FALLBACKS}, not {fallback!r}")


def _check_tile(tile: int | Sequence[int] | None, factor: int) -> tuple[int, int] | None:
    if tile is None:
        return None
    sides = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise InvalidInputError(f"tile must be an int or (height, width) in pixels, not {tile!r}")
    if min(sides) < MIN_TILE:
        raise InvalidInputError(f"tile {tile!r} is below the minimum tile side of {MIN_TILE} px")
    return sides[0] // factor * factor, sides[1] // factor * factor


def _check_shape(family: ModuleType, vae: nn.Module, op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Validate an input shape; returns it with a time axis for the 3-D models."""
    temporal = family is adapters.wan
    name = type(vae).__name__
    ranks = (4, 5) if temporal else (4,)
    what = ("an image/video" if temporal else "an image") if op == "encode" else "a latent"
    if len(shape) not in ranks:
        want = "(B, C, H, W) or (B, C, T, H, W)" if temporal else "(B, C, H, W)"
        raise InvalidInputError(f"{name} {op}: expected {what} tensor {want}, got shape {shape}")
    if 0 in shape:
        raise InvalidInputError(f"{name} {op}: the input tensor is empty (shape {shape})")
    channels = family.in_channels(vae) if op == "encode" else family.latent_channels(vae)
    if shape[1] != channels:
        raise InvalidInputError(f"{name} {op}: expected {channels} channels, got {shape[1]} (shape {shape})")
    if op == "encode":
        h, w = shape[-2:]
        if h % 8 or w % 8:
            raise InvalidInputError(f"{name} encode: height and width must be multiples of 8, got {h}x{w}")
    if temporal and len(shape) == 4:
        shape = (shape[0], shape[1], 1, *shape[2:])
    return shape


def _fit_frames(x: torch.Tensor, frames: str, name: str) -> torch.Tensor:
    """The encoders take 1 + 4k frames; diffusers silently drops the rest, we never do."""
    t = x.shape[2]
    if (t - 1) % 4 == 0:
        return x
    extra, missing = (t - 1) % 4, 4 - (t - 1) % 4
    if frames == "trim":
        return x[:, :, : t - extra]
    if frames == "pad":
        return torch.cat([x, x[:, :, -1:].expand(-1, -1, missing, -1, -1)], dim=2)
    raise InvalidInputError(
        f"{name} encode: {t} frames is not 1 + 4k; the model would silently drop the last {extra}. "
        f"Pass frames='trim' to drop them or frames='pad' to repeat the last frame {missing} more time(s)."
    )


def _device(vae: nn.Module) -> torch.device:
    p = next(vae.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(vae: nn.Module) -> torch.dtype:
    p = next(vae.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _plan(net: Network, op, shape5, tile, budget, mode, device, dtype) -> Plan:
    return make_plan(net, op, shape5, tile=_check_tile(tile, net.spatial_factor), budget=parse_bytes(budget),
                     device=device, dtype=dtype, mode=mode)


def _network(family: ModuleType, vae: nn.Module, op: str, mode: str, moments: bool = False) -> Network:
    return family.encoder(vae, mode, moments) if op == "encode" else family.decoder(vae, mode)


# --------------------------------------------------------------------------------------------- run


def _untiled(vae: nn.Module, op: str, x: torch.Tensor, moments: bool = False) -> torch.Tensor:
    if op == "decode":
        return vae.decode(x).sample
    dist = vae.encode(x).latent_dist
    return dist.parameters if moments else dist.mode()


@contextlib.contextmanager
def _upcast(vae: nn.Module) -> Iterator[torch.dtype]:
    """Run a float16 VAE whose config asks for ``force_upcast`` in float32, as diffusers pipelines do."""
    dtype = _dtype(vae)
    if dtype == torch.float16 and getattr(vae, "config", {}).get("force_upcast", False):
        nn.Module.to(vae, torch.float32)  # diffusers' own .to() logs a spurious warning on dtype casts
        try:
            yield torch.float32
        finally:
            nn.Module.to(vae, dtype)
    else:
        yield dtype


def _run(op, vae, x, tile, budget, mode, frames, fallback, output_device, progress, plan_, moments=False):
    _check_options(op, mode, frames, fallback)
    try:
        family = adapters.adapter_for(vae)
    except UnsupportedArchitectureError as e:
        if fallback != "full":
            raise
        warnings.warn(f"{e}; running the model's own untiled {op} instead", stacklevel=3)
        with torch.no_grad():
            return _untiled(vae, op, x, moments)
    name = type(vae).__name__
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name} {op}: expected a torch.Tensor, got {type(x).__name__}")
    shape5 = _check_shape(family, vae, op, tuple(x.shape))
    if not x.is_floating_point():
        raise InvalidInputError(f"{name} {op}: expected a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError(f"{name} {op}: the input contains NaN or Inf values")
    squeeze = len(shape5) != x.dim()
    if squeeze:
        x = x.unsqueeze(2)
    if op == "encode" and family is adapters.wan:
        x = _fit_frames(x, frames, name)
    out_device = torch.device(output_device) if output_device is not None else x.device

    with torch.no_grad(), _upcast(vae) as dtype:
        device = _device(vae)
        net = _network(family, vae, op, mode, moments)
        if plan_ is None:
            plan_ = _plan(net, op, tuple(x.shape), tile, budget, mode, device, dtype)
        elif plan_.op != op or plan_.in_shape != tuple(x.shape) or plan_.mode != mode:
            raise InvalidInputError(
                f"the plan was made for {plan_.op} of {plan_.in_shape} in {plan_.mode} mode, "
                f"not {op} of {tuple(x.shape)} in {mode} mode"
            )
        fixed = _fast_stats(vae, net, op, x.to(dtype), plan_) if mode == "fast" else {}
        park = device if plan_.park == "device" else torch.device("cpu")
        tick = _ticker(plan_, net, x.shape[2] if net.temporal else 1, progress)
        caches = device if plan_.cache_at == "device" else torch.device("cpu")
        y = execute(net, plan_.segments, x.to(dtype), Run(device, park, out_device, fixed, tick, caches))
    if not bool(torch.isfinite(y).all()):
        raise NonFiniteOutputError(
            f"{name} {op} produced NaN/Inf values in {dtype}: the VAE overflowed. Run it in float32 or "
            "bfloat16, or use an fp16-safe VAE (for SDXL: madebyollin/sdxl-vae-fp16-fix)."
        )
    return y.squeeze(2) if squeeze else y


def _ticker(plan_: Plan, net: Network, t: int, progress: Progress | None) -> Callable[[], None]:
    if progress is None:
        return lambda: None
    chunks = len(net.chunks(t)) if net.temporal else 1
    total = sum(1 if s.is_global else len(s.layout) for s in plan_.segments) * chunks
    done = 0
    progress(0, total)

    def tick() -> None:
        nonlocal done
        done += 1
        progress(done, total)

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
