"""The options every front end passes on: one frozen record, checked once, when it is made.

The API (``qv.encode`` ...), the diffusers hooks, the ComfyUI nodes and the command line all build
an :class:`Options` from what the user gave and hand it on; nothing past this module checks an
option again. Each choice has one spelling: ``mode`` exact/fast, ``frames`` error/trim/pad,
``fallback`` error/full.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import distributed
from .errors import InvalidInputError
from .planner import MIN_TILE, Plan

Progress = Callable[[int, int], None]
MODES = ("exact", "fast")
FRAMES = ("error", "trim", "pad")
FALLBACKS = ("error", "full")

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)")  # plain decimals only: no "1,5", "0x10", "1e400"


@dataclass(frozen=True)
class Options:
    """How to run: tile (h, w) px, budget bytes, mode, frames, fallback, output device, progress, plan, group.

    Made from what a user may pass (``tile=512``, ``budget="4GB"``, ``output_device="cpu"``) and
    stored normalised; a wrong value raises :class:`InvalidInputError` here, before any work.
    """

    tile: int | float | Sequence | None = None
    budget: int | float | str | None = None
    mode: str = "exact"
    frames: str = "error"
    fallback: str = "error"
    output_device: torch.device | str | None = None
    progress: Progress | None = None
    plan: Plan | None = None
    group: object = None  # a torch.distributed ProcessGroup or qv.Ranks: tile-parallel; stored as Ranks | None

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalise once, here
        fix(self, "tile", parse_tile(self.tile))
        fix(self, "budget", parse_bytes(self.budget))
        _choice("mode", self.mode, MODES)
        _choice("frames", self.frames, FRAMES)
        _choice("fallback", self.fallback, FALLBACKS)
        fix(self, "output_device", None if self.output_device is None else parse_device(self.output_device))
        if self.progress is not None and not callable(self.progress):
            raise InvalidInputError(f"progress must be a callable (done, total), not {type(self.progress).__name__}")
        if self.plan is not None and not isinstance(self.plan, Plan):
            raise InvalidInputError(f"plan must be a Plan from qv.plan(...), not {type(self.plan).__name__}")
        fix(self, "group", distributed.ranks(self.group))


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidInputError(f"{name} must be one of {allowed}, not {value!r}")


def integral(value: object, what: str) -> int:
    """``value`` as an int when it is an integral number (64, 64.0, numpy.int64(64)); refuses the rest."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{what} must be an integer, not {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(value) or value != int(value):
        raise InvalidInputError(f"{what} must be an integer, not {value!r}")
    return int(value)


def parse_tile(tile: object) -> tuple[int, int] | None:
    """``tile`` as (height, width) pixels: an integral number or a pair of them, at least MIN_TILE."""
    if tile is None:
        return None
    sides = tile if isinstance(tile, (tuple, list)) else (tile,) * 2
    if isinstance(tile, str) or len(sides) != 2:
        raise InvalidInputError(f"tile must be an int or (height, width) in pixels, not {tile!r}")
    try:
        h, w = (integral(s, "tile") for s in sides)
    except InvalidInputError as e:
        raise InvalidInputError(f"tile must be an int or (height, width) in pixels, not {tile!r}") from e
    if min(h, w) < MIN_TILE:
        raise InvalidInputError(f"tile {tile!r} is below the minimum tile side of {MIN_TILE} px")
    return h, w


def parse_bytes(value: object) -> int | None:
    """``4GB``, ``512MiB``, ``1.5g`` or a number of bytes (binary units: 1GB = 2**30 bytes)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise InvalidInputError(f"memory size must be a finite number of bytes, not {value!r}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value.strip().lower().replace(" ", ""))
        if m is None or m.group(2) not in _UNITS:
            raise InvalidInputError(f"cannot read memory size {value!r}: use bytes or a size like '4GB' or '512MB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    else:
        raise InvalidInputError(f"memory size must be bytes or a string like '4GB', not {type(value).__name__}")
    if n <= 0:
        raise InvalidInputError(f"memory size must be positive, got {value!r}")
    return n


def parse_device(device: object, here: bool = True) -> torch.device:
    """A device that exists here and can hold data: refuses unknown names, ``meta`` and absent CUDA/MPS.

    ``here=False`` (planning with a given budget for a device elsewhere) checks only the name.
    """
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise InvalidInputError(f"unknown device {device!r}: {e}") from e
    if not isinstance(device, torch.device):
        raise InvalidInputError(f"device must be a str or torch.device, got {type(device).__name__}")
    if device.type == "meta":
        raise InvalidInputError("device 'meta' holds no data; use cpu, cuda or mps")
    if not here:
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {str(device)!r} requested but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(f"device {str(device)!r} requested but MPS is not available here")
    return device


def parse_shape(shape: object) -> tuple[int, ...]:
    """An input shape as positive ints; refuses strings, fractions and sizes below 1."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise InvalidInputError(f"shape must be a sequence of sizes, not {shape!r}")
    sizes = tuple(integral(s, f"shape {tuple(shape)!r}: each size") for s in shape)
    if any(s < 0 for s in sizes):
        raise InvalidInputError(f"shape {sizes} has a negative size")
    return sizes
