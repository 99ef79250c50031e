"""Exceptions raised by quadtree-vae: all but the last two are raised before any heavy work starts."""

from __future__ import annotations

import torch

TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # what a backend raises when out of memory


class QuadtreeVAEError(Exception):
    """Base class of the errors this package raises on purpose."""


class UnsupportedArchitectureError(QuadtreeVAEError, TypeError):
    """The model is not one the engine can tile exactly; the message names the class and what was missing."""


class InvalidInputError(QuadtreeVAEError, ValueError):
    """The tensor, option or file given cannot be processed as asked; the message says why and how to fix it."""


class LoadError(QuadtreeVAEError, ValueError):
    """A checkpoint file or folder could not be recognised or read; the message names the file."""


class NonFiniteOutputError(QuadtreeVAEError, FloatingPointError):
    """The model produced NaN/Inf (typically float16 overflow); the message names the fix."""


class OutOfMemoryError(QuadtreeVAEError, TORCH_OOM):
    """A tile ran out of device memory even at the smallest tiles the model allows (the engine splits
    tiles that run out of memory and goes on; see :class:`quadtree_vae.planner.Replanner`). ``plan``
    is the smallest plan tried. It is also a ``torch.OutOfMemoryError``, so code that catches that
    (a UI's own fallback) still does."""

    def __init__(self, message: str, plan=None):
        super().__init__(message)
        self.plan = plan
