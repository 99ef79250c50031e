"""diffusers integration: route a VAE's own ``encode`` / ``decode`` through the tiled engine.

>>> import quadtree_vae as qv
>>> qv.enable(pipe.vae, tile=512)          # every pipe(...) call now encodes/decodes tile by tile
>>> qv.disable(pipe.vae)                   # the model is exactly as it was
>>> with qv.tiled(pipe.vae, budget="4GB"):  # or for one block only
...     image = pipe(prompt).images[0]

How it attaches (in the spirit of accelerate's hooks: attach to a model, detach cleanly): two
instance attributes shadow the class's ``_encode`` and ``_decode`` methods, and a third holds the
options and whatever instance attributes of those names were there before. diffusers' public
``encode`` / ``decode`` call ``_encode`` / ``_decode`` (once per sample when ``enable_slicing()`` is
on) and keep their ``apply_forward_hook`` (model CPU offload moves the model to its device before
the call), so everything around the two methods - posterior construction, slicing, ``return_dict``,
``forward()``, pipelines - stays diffusers' own. :func:`disable` deletes the attributes (or puts
back what was there), leaving ``vars()`` of the model as before.

What the shadowed methods return, per class (as read in diffusers 0.42):

* ``AutoencoderKL._encode(x)`` / ``AutoencoderKLFlux2._encode(x)``: the moments
  ``quant_conv(encoder(x))`` (mean and log-variance); ours: :func:`quadtree_vae.api.encode_moments`.
  The public ``encode`` wraps them in a real ``DiagonalGaussianDistribution``, so ``.mode()``,
  ``.sample(generator)`` and ``.kl()`` work. (Flux.2's latent patchify and batch norm are the
  pipeline's, outside these methods, and stay so.)
* ``AutoencoderKLWan._encode(x)`` (Wan 2.1 and 2.2) / ``AutoencoderKLQwenImage._encode(x)`` /
  ``AutoencoderKLQwenImage21._encode(x)``: the same for video (B, C, T, H, W). Like diffusers, a
  clip whose frame count is not 1 + 4k loses its last frames (``frames="trim"``, the default
  here; pass ``frames="error"`` or ``"pad"`` to change it).
* ``_decode(z, return_dict=True)``: ``DecoderOutput(sample=...)`` or ``(sample,)``; for the Wan and
  Qwen-Image classes (2.1 included) the sample is clamped to [-1, 1], as theirs is (the engine's
  decoder ends with the same clamp).

While enabled, diffusers' own tiling (``enable_tiling()`` / ``use_tiling``) is ignored: the
shadowing methods never look at it, so the engine's exact tiling takes precedence; the flag is
left as it was and takes effect again after :func:`disable`. Results are returned in the model's
dtype and on the input's device, as the untiled methods return them.

The engine keeps no autograd graph. A call on an input that requires grad (with grad enabled) is
therefore passed to the model's own untiled method, with a warning, so gradients still flow.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import adapters
from .api import _dtype, run_tiled
from .errors import InvalidInputError, UnsupportedArchitectureError
from .options import Options

__all__ = ["STATE_ATTR", "disable", "enable", "is_enabled", "tiled"]

#: The instance attribute holding the hook state of an enabled model.
STATE_ATTR = "_quadtree_vae_hooks"
_SHADOWED = ("_encode", "_decode")


class _Missing:
    """"No instance attribute of this name was there before": one object, also across copy and pickle."""

    def __repr__(self) -> str:
        return "<missing>"

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()
_local = threading.local()  # ids of the models whose engine run is in progress, per thread


@dataclass
class _HookState:
    options: Options  # checked once, by enable
    saved: dict[str, Any]  # shadowed name -> the instance attribute it replaced, or _MISSING


def enable(
    vae: nn.Module,
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    *,
    frames: str = "trim",
    fallback: str = "error",
    progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Make ``vae.encode`` / ``vae.decode`` (and so any pipeline holding ``vae``) run tiled.

    ``tile``, ``budget`` and ``mode`` are those of :func:`quadtree_vae.encode`; ``frames`` says what
    to do with a clip of the wrong length (default ``"trim"``: drop the extra frames, as diffusers
    does); ``progress(done, total)`` is called as tiles finish, once per engine run (so once per
    sample with slicing on). Returns ``vae`` (the same object, hooked in place).

    Raises :class:`InvalidInputError` if ``vae`` is already enabled (call :func:`disable` first) or an
    option is invalid, and :class:`UnsupportedArchitectureError` for a model the engine cannot tile;
    with ``fallback="full"`` such a model is left untouched, with a warning, and keeps running its
    own untiled path.
    """
    opts = Options(tile, budget, mode, frames, fallback, progress=progress)
    if not isinstance(vae, nn.Module):
        raise UnsupportedArchitectureError(
            f"qv.enable: expected a diffusers VAE (torch module), got {type(vae).__name__}"
        )
    if is_enabled(vae):
        raise InvalidInputError(
            f"qv.enable: this {type(vae).__name__} is already enabled; call qv.disable(vae) before enabling it "
            f"again with other options"
        )
    try:
        adapters.adapter_for(vae)
        missing = [n for n in _SHADOWED if not callable(getattr(vae, n, None))]
        if missing:
            raise UnsupportedArchitectureError(f"{type(vae).__name__} has no {' / '.join(missing)} method to hook")
    except UnsupportedArchitectureError as e:
        if opts.fallback != "full":
            raise
        warnings.warn(f"qv.enable: {e}; leaving the model untouched (it runs its own untiled path)", stacklevel=2)
        return vae

    own = vars(vae)
    state = _HookState(opts, {n: own.get(n, _MISSING) for n in _SHADOWED})
    try:
        own[STATE_ATTR] = state
        own["_encode"] = _Hook(vae, "_encode")
        own["_decode"] = _Hook(vae, "_decode")
    except BaseException:
        _restore(vae, state)
        raise
    return vae


def disable(vae: nn.Module) -> bool:
    """Undo :func:`enable`: delete the shadowing attributes (or put back the ones they replaced).

    Returns True if hooks were removed, False if ``vae`` was not enabled (nothing to do). If
    something else has replaced one of our methods since, that replacement is left in place (with a
    warning); our method, if it still runs underneath it, then passes straight to the class's own.
    """
    state = vars(vae).get(STATE_ATTR) if hasattr(vae, "__dict__") else None
    if not isinstance(state, _HookState):
        return False
    _restore(vae, state)
    return True


def is_enabled(vae: nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``vae``."""
    return hasattr(vae, "__dict__") and isinstance(vars(vae).get(STATE_ATTR), _HookState)


@contextlib.contextmanager
def tiled(
    vae: nn.Module,
    tile: int | tuple[int, int] | None = None,
    budget: int | str | None = None,
    mode: str = "exact",
    **options: Any,
) -> Iterator[nn.Module]:
    """``with qv.tiled(vae, ...):`` - :func:`enable` on entry, :func:`disable` on exit, also on an
    exception. Takes the options of :func:`enable`; yields ``vae``."""
    enable(vae, tile, budget, mode, **options)
    try:
        yield vae
    finally:
        disable(vae)


# ------------------------------------------------------------------------------------------ internals


def _restore(vae: nn.Module, state: _HookState) -> None:
    own = vars(vae)
    for name, before in state.saved.items():
        current = own.get(name, _MISSING)
        if current is not _MISSING and not _ours(current, vae, name):
            warnings.warn(
                f"qv.disable: {type(vae).__name__}.{name} was replaced after qv.enable; leaving that replacement "
                f"in place",
                stacklevel=3,
            )
            continue
        if before is _MISSING:
            own.pop(name, None)
        else:
            own[name] = before
    if own.get(STATE_ATTR) is state:
        del own[STATE_ATTR]


def _ours(value: Any, vae: nn.Module, name: str) -> bool:
    return isinstance(value, _Hook) and value.vae is vae and value.name == name


def _original(vae: nn.Module, name: str, state: _HookState | None) -> Callable[..., Any]:
    """What ``vae.<name>`` was before enable: the replaced instance attribute, else the class's method."""
    if state is not None:
        before = state.saved.get(name, _MISSING)
        if before is not _MISSING:
            return before
    return getattr(type(vae), name).__get__(vae, type(vae))


def _busy_ids() -> set[int]:
    ids = getattr(_local, "ids", None)
    if ids is None:
        ids = _local.ids = set()
    return ids


@contextlib.contextmanager
def _running(vae: nn.Module) -> Iterator[None]:
    """Mark ``vae`` as inside an engine run: the engine's own untiled calls (fast-mode statistics)
    go through ``vae.encode`` / ``vae.decode`` and must reach the original methods, not us again."""
    ids = _busy_ids()
    ids.add(id(vae))
    try:
        yield
    finally:
        ids.discard(id(vae))


def _active_state(vae: nn.Module, x: Any, args: tuple, kwargs: dict) -> _HookState | None:
    """The hook state if this call should go through the engine, None to pass it to the original
    (with a warning when the caller asked for something the engine cannot do)."""
    state = vars(vae).get(STATE_ATTR)
    if not isinstance(state, _HookState) or id(vae) in _busy_ids():
        return None
    if args or kwargs:
        shown = ", ".join([*(type(a).__name__ for a in args), *(f"{k}=..." for k in kwargs)])
        warnings.warn(
            f"quadtree-vae: {type(vae).__name__} called with arguments the tiled engine does not take "
            f"({shown}); this call runs the model's own untiled path",
            stacklevel=4,
        )
        return None
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        warnings.warn(
            f"quadtree-vae: {type(vae).__name__} called on a tensor that requires grad; the tiled engine keeps "
            f"no autograd graph, so this call runs the model's own untiled path",
            stacklevel=4,
        )
        return None
    return state


class _Hook:
    """The callable that shadows ``vae._encode`` / ``vae._decode``: a bound method that survives
    ``copy.deepcopy`` and pickling of the model (the copy's hook is bound to the copy)."""

    def __init__(self, vae: nn.Module, name: str):
        self.vae = vae
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _METHODS[self.name](self.vae, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<quadtree-vae tiled {self.name} of {type(self.vae).__name__} at {id(self.vae):#x}>"


def _encode(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """quadtree-vae's tiled replacement of ``_encode``: the posterior's moments (2C channels)."""
    state = _active_state(self, x, args, kwargs)
    if state is None:
        return _original(self, "_encode", vars(self).get(STATE_ATTR))(x, *args, **kwargs)
    dtype = _dtype(self)
    with _running(self):
        h = run_tiled("encode", self, x, state.options, moments=True)
    return h.to(dtype)


def _decode(self: nn.Module, z: torch.Tensor, return_dict: bool = True, *args: Any, **kwargs: Any) -> Any:
    """quadtree-vae's tiled replacement of ``_decode``: ``DecoderOutput`` or a 1-tuple, as diffusers'."""
    state = _active_state(self, z, args, kwargs)
    if state is None:
        return _original(self, "_decode", vars(self).get(STATE_ATTR))(z, return_dict, *args, **kwargs)
    from diffusers.models.autoencoders.vae import DecoderOutput

    dtype = _dtype(self)
    with _running(self):
        y = run_tiled("decode", self, z, state.options)
    y = y.to(dtype)
    if not return_dict:
        return (y,)
    return DecoderOutput(sample=y)


_METHODS = {"_encode": _encode, "_decode": _decode}
