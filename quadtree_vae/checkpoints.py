"""Reading a checkpoint file into a flat dict of tensors, without ever running pickled code.

The file formats are read by their own libraries: safetensors checks its header (length, JSON,
that the data covers every tensor) before reading any tensor, and ``torch.load(weights_only=True)``
refuses any pickled object other than tensors and plain containers. This module only turns their
failures into a :class:`~quadtree_vae.errors.LoadError` that names the file and keeps the cause,
and looks through ``{"state_dict": ...}``-style wrappers.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import LoadError

__all__ = ["TORCH_EXTS", "headline", "read_state_dict", "tensors_only"]

#: File extensions read with ``torch.load``.
TORCH_EXTS = (".pt", ".pth", ".ckpt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or PyTorch checkpoint file, on CPU, as stored."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif suffix in TORCH_EXTS:
        obj = _read_torch(path)
    else:
        raise LoadError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; expected .safetensors, "
            f"{', '.join(TORCH_EXTS)} or a diffusers folder"
        )
    return tensors_only(obj, str(path))


def tensors_only(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}``-style containers and keep only the tensor entries."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise LoadError(f"{source}: expected a mapping of names to tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(repr, list(obj.keys())[:8]))
        raise LoadError(f"{source}: no tensors found (top-level keys: {keys or 'none'})")
    return tensors


def headline(error: BaseException) -> str:
    """The first line of an error's message, joined with the next one when it only introduces them
    (torch and diffusers append paragraphs of advice, or list the details under a heading)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors' own messages name what is wrong ("header too large", "incomplete metadata")."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise LoadError(f"{path}: not a readable safetensors file: {e}") from e


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise LoadError(
                f"{path}: refused: the pickle holds objects other than tensors and plain containers "
                f"({', '.join(unsafe[:5])}), which are never unpickled here (weights_only=True). "
                f"Re-save the weights as .safetensors from a trusted environment."
            ) from e
        # torch raises its advice about weights_only=False from inside the unpickler's own error.
        inner = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
        raise LoadError(f"{path}: not a readable PyTorch checkpoint (corrupt pickle: {inner})") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors, ...
        raise LoadError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {headline(e)})") from e


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a checkpoint's pickle names beyond what weights_only allows,
    found by reading the opcodes, never by unpickling; [] when the file is not a torch.save zip."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        return list(get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a corrupt or legacy file: the caller reports the load error itself
        return []
