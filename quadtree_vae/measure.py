"""Time and peak memory of one call, for the demo and the benchmark.

On CPU the kernel's high-water mark of this process's resident set is reset
(``/proc/self/clear_refs``), the call runs, and the peak is the new high-water mark minus the
resident size just before the call. Large blocks are served by ``mmap`` and freed memory is handed
back (``mallopt``/``malloc_trim``), so memory freed by an earlier call is not silently reused and
hidden from the next. On CUDA it is ``max_memory_allocated`` above what was allocated before.
Where neither is available (no Linux ``/proc``), the peak is None.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .planner import fmt_bytes

__all__ = ["Peak", "fmt_bytes", "fmt_seconds", "measure", "peak_tracker"]

T = TypeVar("T")
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)  # fixed threshold: big tensors are unmapped when freed
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_high_water_mark() -> bool:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    bytes: int | None = None  # set when the tracked block ends


@contextlib.contextmanager
def peak_tracker(device: torch.device | str = "cpu") -> Iterator[Peak]:
    """``with peak_tracker(device) as p: ...`` then ``p.bytes``: peak memory added inside the block."""
    dev = torch.device(device)
    peak = Peak()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        yield peak
        torch.cuda.synchronize(dev)
        peak.bytes = max(0, torch.cuda.max_memory_allocated(dev) - base)
        return
    ok = _reset_high_water_mark()
    base = _status("VmRSS")
    yield peak
    top = _status("VmHWM")
    if ok and base is not None and top is not None:
        peak.bytes = max(0, top - base)


def measure(fn: Callable[..., T], *args: Any, device: torch.device | str = "cpu") -> tuple[T, float, int | None]:
    """Run ``fn(*args)`` once; return ``(result, seconds, peak_bytes)``."""
    with peak_tracker(device) as peak:
        start = time.perf_counter()
        result = fn(*args)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return result, seconds, peak.bytes


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{int(s // 60)} min {s % 60:.0f} s"

