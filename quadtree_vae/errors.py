"""Exceptions raised by quadtree-vae: all are raised before any heavy work starts."""

from __future__ import annotations


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
