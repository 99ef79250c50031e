"""The ``qvae`` command: encode, decode, roundtrip, inspect and demo.

Run ``qvae COMMAND --help`` for the flags. Conventions:

* ``--vae`` takes a checkpoint (file or diffusers folder) or ``random:ARCH[:tiny][:seed=N]``
  (default ``random:wan2.1``, the full Wan 2.1 architecture with seeded random weights). Anything
  made with random weights says so on stderr and in the latent file's metadata.
* Images are RGB in [-1, 1]. Sides that are not multiples of 8 are refused unless ``--fit crop``
  (centre crop to the multiple of 8 below; the cropped border is lost) or ``--fit pad`` (repeat the
  last row/column up to the multiple of 8 above; decode crops the padding off again).
* Videos go through PyAV. The Wan/Qwen-Image VAEs take 1 + 4k frames: other counts are refused
  unless ``--frames trim`` (drop the extra frames) or ``--frames pad`` (repeat the last frame;
  decode drops the copies again). The frame rate and the original frame count travel in the latent
  metadata. A 2-D (SD-family) VAE encodes a video frame by frame, as a batch of images: the latent
  is (T, C, h, w) and decode makes a video of T frames again.
* Latents are raw ``latent_dist.mode()`` values (not multiplied by ``scaling_factor``), stored as
  the safetensors key "latent".
* Outputs are written atomically and never overwrite an existing file without ``--force``; that
  and everything else that can be checked is checked before the model runs.
* Errors print ``error: <message>`` and exit with status 2 (bad input, unsupported model, load
  error); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import __version__, api, dataset, media
from .errors import InvalidInputError, QuadtreeVAEError, UnsupportedArchitectureError
from .planner import available_memory, fmt_bytes, parse_bytes

DEFAULT_VAE = "random:wan2.1"
RANDOM_NOTE = "random weights: output is not a real image"
FRAME_POLICIES = ("error", "trim", "pad")
FITS = ("crop", "pad")
LATENT_VERSION = "1"
DEMO_LAYOUT = "qvae-demo-layout.png"
_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
EPILOG = """\
conventions:
  --vae defaults to random:wan2.1: the full Wan 2.1 architecture with seeded random
    weights; outputs made with random weights say so (stderr and latent metadata).
  sides not multiples of 8 are refused unless --fit crop (centre crop) or --fit pad
    (edge padding, cropped off again on decode).
  Wan/Qwen-Image take 1+4k frames: other counts are refused unless --frames trim or
    --frames pad (the copies are dropped again on decode). fps and the original frame
    count are kept in the latent metadata.
  a 2-D (SD-family) VAE encodes a video frame by frame: latents (T, C, h, w).
  latents are raw latent_dist.mode() values (no scaling_factor), key "latent".
  outputs are written atomically and never overwrite a file without --force.
  exit status: 0 ok, 2 bad input / unsupported model / load error, 1 other errors.

Run 'qvae COMMAND --help' for a command's flags."""


# ------------------------------------------------------------------------------------------ output


class _Out:
    """Where messages go: results on stdout; notes on stderr (hidden by --quiet); warnings always."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def result(self, msg: str = "") -> None:
        print(msg, file=sys.stdout, flush=True)

    def note(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def note_start(self, msg: str) -> None:
        """The first part of a note line, finished by the next ``note``."""
        if not self.quiet:
            print(msg, end="", file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class _Bar:
    """A tqdm bar over tiles x time chunks (x items when a batch runs item by item), with ETA.

    ``part(k)`` gives the ``progress(done, total)`` callback for item ``k`` of ``parts``."""

    def __init__(self, desc: str, enabled: bool, parts: int = 1):
        self.desc, self.enabled, self.parts = desc, enabled, parts
        self.bar = None
        self.shown = 0

    def part(self, k: int) -> Callable[[int, int], None] | None:
        if not self.enabled:
            return None

        def progress(done: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total * self.parts, desc=self.desc, unit="tile", file=sys.stderr,
                                dynamic_ncols=True, mininterval=0.25, leave=False)
            n = k * total + done
            if n > self.shown:
                self.bar.update(n - self.shown)
                self.shown = n

        return progress

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_enabled(args) -> bool:
    if args.quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ parsing


def _parse_tile(value: str) -> int | tuple[int, int]:
    v = value.strip().lower()
    try:
        if "x" in v:
            h, w = v.split("x")
            return int(h), int(w)
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW pixels, got {value!r}") from None


def _parse_size(value: str) -> tuple[int, int]:
    t = _parse_tile(value)
    h, w = (t, t) if isinstance(t, int) else t
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {value!r}")
    return h, w


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _fps(value: str) -> Fraction:
    try:
        f = Fraction(value)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a frame rate like 16 or 30000/1001, got {value!r}") from None
    if f <= 0:
        raise argparse.ArgumentTypeError(f"the frame rate must be positive, got {value!r}")
    return f.limit_denominator(1001 * 1000)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and tiling")
    g.add_argument("--vae", default=DEFAULT_VAE, metavar="PATH|random:ARCH",
                   help="checkpoint file or diffusers folder, or random:ARCH[:tiny][:seed=N] with ARCH one of "
                        "wan2.1, qwen-image, sd, sdxl, flux, sd3 (default: %(default)s, random weights)")
    g.add_argument("--arch", default=None,
                   help="architecture hint for a checkpoint whose keys cannot tell (qwen-image vs wan2.1, "
                        "sdxl vs sd, sd3 vs flux)")
    g.add_argument("--budget", default=None, metavar="SIZE",
                   help="device memory budget, e.g. 4GB or 512MB (default: the device's free memory)")
    g.add_argument("--tile", type=_parse_tile, default=None, metavar="N|HxW",
                   help="largest region, in image pixels, a block runs on at image resolution, halo "
                        "included (the model sets a minimum, e.g. 24 for Wan 2.1)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    g.add_argument("--mode", choices=("exact", "fast"), default="exact",
                   help="exact: equal to the untiled model; fast: GroupNorm statistics estimated once")
    g.add_argument("--fallback", choices=("error", "full"), default="error",
                   help="for a model the engine cannot tile: refuse (default) or run it untiled")
    o = common.add_argument_group("output")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes (warnings still show)")
    o.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    fit = argparse.ArgumentParser(add_help=False)
    f = fit.add_argument_group("input fitting")
    f.add_argument("--frames", choices=FRAME_POLICIES, default=None,
                   help="a video whose frame count is not 1+4k (Wan/Qwen-Image): refuse (error, default), "
                        "trim the extra frames, or pad by repeating the last frame (decode drops the copies)")
    f.add_argument("--fit", choices=FITS, default=None,
                   help="sides that are not multiples of 8: refuse (default), centre-crop down, or pad up by "
                        "repeating the edge (decode crops the padding off)")

    parser = argparse.ArgumentParser(
        prog="qvae",
        description="Encode/decode images and videos through diffusion VAEs tile by tile under a memory budget; "
                    "the result equals the untiled model's.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("encode", parents=[common, fit], help="image or video -> latents (.safetensors)",
                       description="Encode an image or a video into a latent file (key 'latent', with metadata).")
    p.add_argument("input", metavar="INPUT", help="image (.png .jpg .webp ...) or video (.mp4 .webm .gif ...)")
    p.add_argument("-o", "--output", required=True, metavar="LATENTS.safetensors")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", parents=[common], help="latents -> image or video",
                       description="Decode a latent file into an image (.png .jpg .webp) or a video (.mp4 .webm .gif).")
    p.add_argument("latents", metavar="LATENTS", help="a .safetensors file written by 'qvae encode'")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--fps", type=_fps, default=None,
                   help="frame rate of a video output (default: the rate stored in the latents, else 16)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("roundtrip", parents=[common, fit], help="encode + decode, print PSNR and SSIM",
                       description="Encode and decode an image or a video, write the result and print PSNR/SSIM "
                                   "against the input (8-bit RGB, measured before the output file's codec).")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.set_defaults(func=cmd_roundtrip)

    p = sub.add_parser("inspect", parents=[common], help="model summary and tile plans for a size",
                       description="Show the detected architecture, parameter count and the encode/decode tile plans "
                                   "(segments, tiles, halos, estimated memory) for a size, an input file or a latent "
                                   "file.")
    p.add_argument("input", metavar="INPUT", nargs="?", help="optional image, video or latent file to plan for")
    p.add_argument("--size", type=_parse_size, default=None, metavar="HxW", help="image size in pixels (or N for NxN)")
    p.add_argument("--frames", type=_positive_int, default=None, metavar="T",
                   help="video frame count (Wan/Qwen-Image; default 1)")
    p.add_argument("--fit", choices=FITS, default=None, help="as for encode, for sizes that are not multiples of 8")
    p.add_argument("--op", choices=("encode", "decode", "both"), default="both", help="which plans to show")
    p.add_argument("--plot", default=None, metavar="LAYOUT.png",
                   help="draw the tiles of the image-resolution segment (of the decode plan, or of the encode "
                        "plan with --op encode) over the input image or a blank canvas")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", parents=[common], help="tiled vs untiled on a sample image and clip",
                       description="Encode and decode the bundled sample image and a generated clip of moving "
                                   "shapes, tiled and untiled, and print exactness, time and peak memory side by "
                                   "side; writes the tile layout picture.")
    p.add_argument("--size", type=_positive_int, default=256, metavar="N",
                   help="image side in pixels, a multiple of 16, at least 64 (default %(default)s); the clip is N/2")
    p.add_argument("--frames", type=_positive_int, default=5, metavar="T", help="clip frames (default %(default)s)")
    p.add_argument("--out", default=".", metavar="DIR", help=f"folder for {DEMO_LAYOUT} (default: current folder)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads for the measured runs (default: torch's default)")
    p.set_defaults(func=cmd_demo)

    dataset.add_parser(sub, parents=[common, fit])
    return parser


# ------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (status 2)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    out = _Out(args.quiet)

    def show(message, category, filename, lineno, file=None, line=None):
        out.warn(str(message))

    old_show = warnings.showwarning
    warnings.showwarning = show
    try:
        return int(args.func(args, out) or 0)
    except QuadtreeVAEError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except _OUT_OF_MEMORY as e:
        if args.debug:
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        print(f"error: out of memory ({detail}); try a smaller --tile or --budget", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # e.g. `qvae inspect ... | head`: stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # disk full, permission denied, ...: the environment, not a bug
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        warnings.showwarning = old_show


# --------------------------------------------------------------------------------------- shared steps


def _load(args, out: _Out):
    from .loading import describe, fingerprint, parse_vae_spec

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae = parse_vae_spec(args.vae, device=device, dtype=args.dtype, arch=args.arch)
    info = describe(vae)
    info["fingerprint"] = fingerprint(vae)
    info["spec"] = args.vae if info["random"] else Path(args.vae).name
    info["dtype"] = str(next(vae.parameters()).dtype).removeprefix("torch.")
    out.note(f"vae: {_vae_line(info)} [{time.perf_counter() - t0:.1f} s]")
    return vae, info


def _vae_line(info: dict) -> str:
    factors = f"{info['spatial_factor']}x spatial" + (
        f", {info['temporal_factor']}x temporal" if info["temporal_factor"] else ", 2-D")
    rnd = ", RANDOM weights" if info["random"] else ""
    return (f"{info['spec']} ({info['class']}, arch {info['arch']}, {info['params'] / 1e6:.1f}M parameters, "
            f"{info['latent_channels']} latent channels, {factors}{rnd}, fingerprint {info['fingerprint']})")


def _check_budget(args) -> None:
    parse_bytes(args.budget)


def _temporal(info: dict) -> bool:
    return bool(info.get("temporal_factor"))


def _fit_size(h: int, w: int, fit: str | None, what: str) -> tuple[tuple[int, int], tuple[int, int], list[str]]:
    """((height, width) encoded, (top, left) crop offset, notes) for ``fit``; refuses without one."""
    if h % 8 == 0 and w % 8 == 0:
        return (h, w), (0, 0), []
    down, up = (h // 8 * 8, w // 8 * 8), (math.ceil(h / 8) * 8, math.ceil(w / 8) * 8)
    if fit is None:
        crop = f"--fit crop (centre-crop to {down[0]}x{down[1]})" if min(down) > 0 else None
        pad = f"--fit pad (pad to {up[0]}x{up[1]}; decode crops back to {h}x{w})"
        raise InvalidInputError(
            f"{what} is {h}x{w} (HxW): height and width must be multiples of 8. Pass "
            + (f"{crop} or {pad}" if crop else pad)
        )
    if fit == "crop":
        if min(down) == 0:
            raise InvalidInputError(f"{what} is {h}x{w}: too small to crop to a multiple of 8; use --fit pad")
        top, left = (h - down[0]) // 2, (w - down[1]) // 2
        return down, (top, left), [f"--fit crop: {h}x{w} centre-cropped to {down[0]}x{down[1]}"]
    return up, (0, 0), [f"--fit pad: {h}x{w} padded to {up[0]}x{up[1]} (edge repeated); decode crops it back"]


def _frame_count(t: int, policy: str | None, what: str) -> tuple[int, list[str]]:
    """Frames the Wan/Qwen-Image encoder will see for ``t`` input frames under ``policy``."""
    if (t - 1) % 4 == 0:
        return t, []
    extra, missing = (t - 1) % 4, 4 - (t - 1) % 4
    if policy in (None, "error"):
        raise InvalidInputError(
            f"{what} has {t} frames; this VAE encodes 1+4k frames ({t - extra} or {t + missing}). Pass --frames trim "
            f"to drop the last {extra}, or --frames pad to repeat the last frame {missing} more time(s) "
            f"(decode drops them again)"
        )
    if policy == "trim":
        return t - extra, [f"--frames trim: dropped the last {extra} of {t} frames (encoding {t - extra})"]
    return t + missing, [f"--frames pad: repeated the last frame {missing} time(s) ({t} -> {t + missing} frames); "
                         f"decode drops them again"]


def _prepare(src: media.Media, args, info: dict, what: str, out: _Out):
    """Fit the pixels for the model: returns (x, meta, shown) where ``x`` is the model input
    (B, 3, [T,] H, W) in [-1, 1] on CPU, ``meta`` the latent metadata about the input and ``shown``
    the (T, H, W, 3) uint8 frames a decode of ``x`` should reproduce (after fit/trim, without padding)."""
    frames = src.frames
    t, h, w = frames.shape[:3]
    (eh, ew), (top, left), notes = _fit_size(h, w, args.fit, what)
    meta: dict = {"kind": "video" if src.is_video else "image", "source_size": [h, w]}
    if args.fit and (eh, ew) != (h, w):
        meta["fit"] = args.fit
        if args.fit == "crop":
            frames = frames[:, top:top + eh, left:left + ew]
            meta["crop_offset"] = [top, left]
    shown = frames
    if args.fit == "pad" and (eh, ew) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, eh - h), (0, ew - w), (0, 0)), mode="edge")
    meta["image_size"] = [eh, ew]
    meta["frames"] = t
    if src.fps is not None:
        meta["fps"] = str(src.fps)
    temporal = _temporal(info)
    if temporal:
        n, more = _frame_count(t, args.frames, what)
        notes += more
        if n < t:
            frames, shown = frames[:n], shown[:n]
            meta["frames_trimmed"] = t - n
        elif n > t:
            frames = np.concatenate([frames, np.repeat(frames[-1:], n - t, axis=0)])
            meta["frames_padded"] = n - t
        meta["frames_encoded"] = n
        x = media.to_tensor(frames).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, H, W)
    else:
        if src.is_video:
            notes.append(f"{info['class']} is a 2-D (image) VAE: encoding the {t} frames one by one as a batch "
                         f"of images (no temporal compression)")
            meta["frames_as_batch"] = True
        if args.frames not in (None, "error"):
            notes.append(f"--frames {args.frames} does not apply to a 2-D VAE (any frame count works)")
        meta["frames_encoded"] = t
        x = media.to_tensor(frames)  # (T, 3, H, W): a batch of images
    for n_ in notes:
        out.note(n_)
    return x, meta, shown


def _run(op: str, vae, x: torch.Tensor, args, bar_desc: str, plan=None) -> torch.Tensor:
    """Run ``qv.encode``/``qv.decode`` item by item over the batch axis, with one progress bar."""
    fn = api.encode if op == "encode" else api.decode
    items = x.shape[0]
    bar = _Bar(bar_desc, _progress_enabled(args), parts=items)
    outs = []
    kw: dict = {"fallback": args.fallback, "output_device": "cpu"}
    if op == "encode":
        kw["frames"] = "error"  # already fitted by _prepare
    try:
        for k in range(items):
            outs.append(fn(vae, x[k:k + 1], args.tile, args.budget, args.mode, progress=bar.part(k), plan=plan, **kw))
    finally:
        bar.close()
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _plan_for(vae, op: str, shape: Sequence[int], args):
    """One item's plan (checks tile/budget/mode/shape), or None where the model cannot be tiled and
    ``--fallback full`` lets it run untiled."""
    item = (1, *tuple(shape)[1:])
    try:
        return api.plan(vae, item, args.tile, args.budget, args.mode, op=op)
    except UnsupportedArchitectureError:
        if args.fallback == "full":
            return None
        raise


def _latent_meta(info: dict, z: torch.Tensor, args, source: Path) -> dict:
    return {
        "version": LATENT_VERSION,
        "quadtree_vae_version": __version__,
        "architecture": info["arch"],
        "vae_class": info["class"],
        "vae": info["spec"],
        "fingerprint": info["fingerprint"],
        "vae_dtype": info["dtype"],
        "random_weights": bool(info["random"]),
        "note": RANDOM_NOTE if info["random"] else None,
        "shape": list(z.shape),
        "dtype": str(z.dtype).removeprefix("torch."),
        "latent_channels": int(z.shape[1]),
        "scaled": False,
        "mode": args.mode,
        "source": source.name,
    }


def _frames_from_output(y: torch.Tensor, temporal: bool) -> np.ndarray:
    """Model output (B, 3, [T,] H, W) -> (B*T, H, W, 3) uint8."""
    if temporal and y.dim() == 5:
        b, c, t, h, w = y.shape
        y = y.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    return media.from_tensor(y)


def _restore(frames: np.ndarray, meta: dict, out: _Out) -> np.ndarray:
    """Undo what encode added: padded frames and padded borders (as the metadata records)."""
    padded = int(media.meta_value(meta, "frames_padded", 0) or 0)
    if padded and frames.shape[0] > padded:
        frames = frames[:-padded]
        out.note(f"dropped the {padded} padding frame(s) added by --frames pad ({frames.shape[0]} frames)")
    if media.meta_value(meta, "fit") == "pad":
        size = media.meta_value(meta, "source_size")
        if isinstance(size, list) and len(size) == 2 and size[0] <= frames.shape[1] and size[1] <= frames.shape[2]:
            frames = frames[:, : size[0], : size[1]]
            out.note(f"cropped the --fit pad border off: {size[0]}x{size[1]}")
    return frames


def _say_random(info: dict, out: _Out) -> None:
    if info["random"]:
        out.warn(RANDOM_NOTE)


# ------------------------------------------------------------------------------------------ commands


def _load_source(args, out: _Out, command: str):
    """Read an image or video and load the VAE, refusing a bad input before the model is loaded.

    Returns (path, media, vae, info, model input, metadata, frames as shown to the model).
    """
    src_path = media.check_input(args.input)
    if media.kind_of(src_path) == "latent":
        raise InvalidInputError(f"{src_path} is a latent file; {command} takes an image or a video "
                                "(use 'qvae decode' for latents)")
    _check_budget(args)
    src = media.read_media(src_path)
    _fit_size(*src.size, args.fit, src_path.name)
    vae, info = _load(args, out)
    x, meta, shown = _prepare(src, args, info, src_path.name, out)
    return src_path, src, vae, info, x, meta, shown


def cmd_encode(args, out: _Out) -> int:
    dest = media.check_output(args.output, args.force, (media.LATENT_EXT,))
    src_path, src, vae, info, x, meta, _ = _load_source(args, out, "encode")
    plan = _plan_for(vae, "encode", x.shape, args)  # validates tile/budget/shape before the heavy work
    t0 = time.perf_counter()
    z = _run("encode", vae, x, args, "encode", plan)
    meta = {**_latent_meta(info, z, args, src_path), **meta}
    media.save_latent(dest, z, meta, force=args.force)
    what = f"{meta['frames']} frames" if src.is_video else "image"
    out.note(f"wrote {dest}: latent {tuple(z.shape)} {meta['dtype']} from {what} {src.size[0]}x{src.size[1]}"
             + (f" at {meta['fps']} fps" if "fps" in meta else "") + f" [{time.perf_counter() - t0:.1f} s]")
    _say_random(info, out)
    return 0


def _decode_checks(z: torch.Tensor, meta: dict, info: dict, src: Path, dest: Path, out: _Out) -> int:
    """Refuse latents the VAE cannot decode; warn about a different model; returns the frame count
    the output will have (after dropping padding frames)."""
    made_by = media.meta_value(meta, "architecture")
    by = f" (made by {made_by}, {media.meta_value(meta, 'vae_class')})" if made_by else ""
    if z.dim() < 2 or z.shape[1] != info["latent_channels"]:
        got = z.shape[1] if z.dim() >= 2 else "no"
        raise InvalidInputError(
            f"{src.name} holds latents with {got} channels{by}, shape {tuple(z.shape)}; the VAE {info['spec']} "
            f"({info['class']}, {info['arch']}) takes {info['latent_channels']}. Pass the VAE that encoded them "
            f"with --vae"
        )
    temporal = _temporal(info)
    if z.dim() == 5 and not temporal:
        raise InvalidInputError(
            f"{src.name} holds 5-D video latents {tuple(z.shape)}{by}; the VAE {info['spec']} ({info['class']}) is a "
            f"2-D image VAE. Pass the VAE that encoded them with --vae"
        )
    if z.dim() not in (4, 5):
        raise InvalidInputError(f"{src.name}: expected a latent of shape (B, C, h, w) or (B, C, T, h, w), "
                                f"got {tuple(z.shape)}")
    fp = media.meta_value(meta, "fingerprint")
    made_in = media.meta_value(meta, "vae_dtype")
    if fp and str(fp) != info["fingerprint"] and made_in and made_in != info["dtype"]:
        out.warn(f"{src.name} was made by a VAE in {made_in} (fingerprint {fp}); decoding in {info['dtype']} "
                 f"(fingerprint {info['fingerprint']}): the fingerprint depends on the dtype, so it cannot tell "
                 f"whether these are the same weights")
    elif fp and str(fp) != info["fingerprint"]:
        out.warn(f"{src.name} was made by a VAE with fingerprint {fp}{by}; decoding with {info['fingerprint']} "
                 f"({info['spec']}): the output will not match the encoded input")
    elif made_by and made_by != info["arch"]:
        out.warn(f"{src.name} was made by {made_by}; decoding with {info['arch']}")
    if media.meta_value(meta, "random_weights") is True and not info["random"]:
        out.warn(f"{src.name} was encoded with random weights: it does not hold a real image")
    count = z.shape[0] * ((z.shape[2] - 1) * (info["temporal_factor"] or 1) + 1 if z.dim() == 5 else 1)
    padded = int(media.meta_value(meta, "frames_padded", 0) or 0)
    if padded and count > padded:
        count -= padded
    if count > 1 and dest.suffix.lower() in media.IMAGE_WRITE:
        raise InvalidInputError(
            f"{src.name} decodes to {count} frames, which do not fit in {dest.suffix}; write a video "
            f"({', '.join(media.VIDEO_WRITE)})"
        )
    return count


def cmd_decode(args, out: _Out) -> int:
    dest = media.check_output(args.output, args.force, media.IMAGE_WRITE + media.VIDEO_WRITE)
    src = media.check_input(args.latents)
    if media.kind_of(src) != "latent":
        raise InvalidInputError(f"{src}: decode takes a latent file ({media.LATENT_EXT}); to encode and decode an "
                                f"image or video use 'qvae roundtrip'")
    _check_budget(args)
    z, meta, notes = media.load_latent(src)
    for n in notes:
        out.note(n)
    vae, info = _load(args, out)
    _decode_checks(z, meta, info, src, dest, out)
    temporal = _temporal(info)
    plan = _plan_for(vae, "decode", z.shape, args)
    fps = args.fps or media.fps_from_meta(media.meta_value(meta, "fps"))
    if dest.suffix.lower() in media.VIDEO_WRITE and fps is None:
        fps = media.DEFAULT_FPS
        out.note(f"no frame rate in {src.name}: writing {fps} fps (set one with --fps)")
    t0 = time.perf_counter()
    y = _run("decode", vae, z, args, "decode", plan)
    frames = _restore(_frames_from_output(y, temporal), meta, out)
    media.write_media(dest, frames, fps, force=args.force)
    out.note(f"wrote {dest}: {_describe_frames(frames, fps if dest.suffix.lower() in media.VIDEO_WRITE else None)} "
             f"[{time.perf_counter() - t0:.1f} s]")
    _say_random(info, out)
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _describe_frames(frames: np.ndarray, fps: Fraction | None) -> str:
    t, h, w = frames.shape[:3]
    if t == 1 and fps is None:
        return f"image {h}x{w}"
    return f"{_plural(t, 'frame')} {h}x{w}" + (f" at {fps} fps" if fps else "")


def cmd_roundtrip(args, out: _Out) -> int:
    dest = media.check_output(args.output, args.force, media.IMAGE_WRITE + media.VIDEO_WRITE)
    src_path, src, vae, info, x, meta, shown = _load_source(args, out, "roundtrip")
    if shown.shape[0] > 1 and dest.suffix.lower() in media.IMAGE_WRITE:
        raise InvalidInputError(f"{src_path.name} has {shown.shape[0]} frames, which do not fit in {dest.suffix}; "
                                f"write a video ({', '.join(media.VIDEO_WRITE)})")
    enc_plan = _plan_for(vae, "encode", x.shape, args)  # both plans are checked before the heavy work
    dec_plan = _plan_for(vae, "decode", enc_plan.out_shape, args) if enc_plan is not None else None
    t0 = time.perf_counter()
    z = _run("encode", vae, x, args, "encode", enc_plan)
    t1 = time.perf_counter()
    y = _run("decode", vae, z, args, "decode", dec_plan)
    t2 = time.perf_counter()
    frames = _restore(_frames_from_output(y, _temporal(info)), meta, _Out(True))
    fps = src.fps if src.is_video else None
    media.write_media(dest, frames, fps, force=args.force)
    p, s = psnr(shown, frames), ssim(shown, frames)
    out.note(f"wrote {dest}: {_describe_frames(frames, fps)}; latent {tuple(z.shape)} "
             f"[encode {t1 - t0:.1f} s, decode {t2 - t1:.1f} s]")
    out.result(f"PSNR {p:.2f} dB  SSIM {s:.4f}  ({_plural(frames.shape[0], 'frame')}, 8-bit RGB, before the "
               f"output file's codec)")
    _say_random(info, out)
    return 0


# ---------------------------------------------------------------------------------------- metrics


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of the same shape (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, size: int = 11) -> float:
    """Mean structural similarity of two (T, H, W, 3) uint8 arrays: Gaussian window (11 px, sigma
    1.5), per RGB channel, constants K1=0.01, K2=0.03, averaged over valid windows, channels and frames."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    h, w = a.shape[1:3]
    size = min(size, h, w)
    size -= 1 - size % 2  # odd
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()
    c1, c2 = 0.01**2, 0.03**2
    total, count = 0.0, 0
    for i in range(0, a.shape[0], 8):
        x = torch.from_numpy(a[i:i + 8]).permute(0, 3, 1, 2).double() / 255
        y = torch.from_numpy(b[i:i + 8]).permute(0, 3, 1, 2).double() / 255

        def blur(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(t, kernel, groups=3)

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        total += float(s.sum())
        count += s.numel()
    return total / count


# ---------------------------------------------------------------------------------------- inspect


def cmd_inspect(args, out: _Out) -> int:
    plot = media.check_output(args.plot, args.force, (".png",)) if args.plot else None
    picture = None
    latent_shape = None
    size, frames = args.size, args.frames
    if args.input:
        src = media.check_input(args.input)
        kind = media.kind_of(src)
        if kind == "latent":
            z, meta, _ = media.load_latent(src)
            latent_shape = tuple(z.shape)
        else:
            (h0, w0), t0, picture = _probe(src, kind)
            size = size or (h0, w0)
            frames = frames or t0
    if size is None and latent_shape is None:
        raise InvalidInputError("inspect: give --size HxW (e.g. --size 720x1280) or an input file")
    budget = parse_bytes(args.budget)
    vae, info = _load(args, _Out(True))
    temporal = _temporal(info)
    out.result(f"vae: {_vae_line(info)}")
    if info["random"]:
        out.result(f"     ({RANDOM_NOTE})")
    sf, tf = info["spatial_factor"] or 8, info["temporal_factor"] or 1

    if latent_shape is not None:
        enc_shape = None
        dec_shape = latent_shape if not (temporal and len(latent_shape) == 4) else (
            latent_shape[0], latent_shape[1], 1, *latent_shape[2:])
        h, w = dec_shape[-2] * sf, dec_shape[-1] * sf
        t_lat = dec_shape[2] if len(dec_shape) == 5 else 1
        out.result(f"input: latents {latent_shape} -> image {h}x{w}"
                   + (f", {_plural((t_lat - 1) * tf + 1, 'frame')}" if temporal else ""))
    else:
        h, w = size
        (h, w), _, notes = _fit_size(h, w, args.fit, f"the size {h}x{w}")
        for n in notes:
            out.result(f"note: {n}")
        t = frames or 1
        if temporal:
            if (t - 1) % 4:
                padded = t + 4 - (t - 1) % 4
                out.result(f"note: {t} frames is not 1+4k: encode needs --frames trim ({t - (t - 1) % 4}) or "
                           f"--frames pad ({padded}); planning for {padded}")
                t = padded
            enc_shape = (1, 3, t, h, w)
            dec_shape = (1, info["latent_channels"], 1 + (t - 1) // tf, h // sf, w // sf)
        else:
            if t > 1:
                out.result(f"note: a 2-D VAE encodes the {t} frames one by one; the plan is per frame")
            enc_shape = (1, 3, h, w)
            dec_shape = (1, info["latent_channels"], h // sf, w // sf)
        out.result(f"input: {h}x{w}" + (f", {_plural(t, 'frame')}" if temporal else "") + f" -> latent {dec_shape}")
    device = next(vae.parameters()).device
    limit = (f"budget {fmt_bytes(budget)}" if budget else
             f"no budget: {fmt_bytes(_free(device))} free on {device.type}")
    tile = args.tile if args.tile is None or isinstance(args.tile, int) else f"{args.tile[0]}x{args.tile[1]}"
    out.result(f"tiling: tile {tile or 'auto'}, {limit}, mode {args.mode}")

    plans = {}
    if enc_shape is not None and args.op in ("encode", "both"):
        plans["encode"] = api.plan(vae, enc_shape, args.tile, args.budget, args.mode, op="encode")
    if args.op in ("decode", "both") or enc_shape is None:
        plans["decode"] = api.plan(vae, dec_shape, args.tile, args.budget, args.mode, op="decode")
    for name, p in plans.items():
        halo = max(s.halo for s in p.segments)
        out.result("")
        out.result(f"{name}: {p.tiles} tiles in {len(p.segments)} segments, widest halo {halo} px, "
                   f"estimated peak {fmt_bytes(p.peak)}, work {p.overhead:.3f}x untiled")
        out.result(p.describe())
    if plot is not None:
        from .plot import draw_layout, image_segment

        p = plans.get("decode") or plans["encode"]
        if args.op == "encode" and "encode" in plans:
            p = plans["encode"]
        if picture is not None and args.fit:
            picture = _fit_picture(picture, args.fit)
        im = draw_layout(p, picture)
        with media.atomic_path(plot, args.force) as tmp:
            im.save(tmp, format="PNG")
        idx, seg = image_segment(p)
        out.result("")
        out.result(f"wrote {plot}: {p.op} segment {idx}, {len(seg.layout)} tiles"
                   + (" over the input" if picture is not None else " on a blank canvas"))
    return 0


def _free(device: torch.device) -> int:
    return available_memory(device)


def _probe(path: Path, kind: str) -> tuple[tuple[int, int], int, np.ndarray]:
    """((H, W), frame count, first frame) without decoding a whole video."""
    if kind == "image":
        frame = media.read_image(path)
        return frame.shape[:2], 1, frame
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise InvalidInputError(f"{path}: the file has no video stream")
            stream = c.streams.video[0]
            first = None
            for f in c.decode(stream):
                first = f.to_ndarray(format="rgb24")
                break
            if first is None:
                raise InvalidInputError(f"{path}: the video has no frames")
            count = stream.frames
            if not count:
                c.seek(0)
                count = sum(1 for p in c.demux(stream) if p.size)
    except av.FFmpegError as e:
        raise InvalidInputError(f"{path}: cannot read the video ({e})") from None
    return first.shape[:2], int(count), first


def _fit_picture(frame: np.ndarray, fit: str) -> np.ndarray:
    h, w = frame.shape[:2]
    (eh, ew), (top, left), _ = _fit_size(h, w, fit, "picture")
    if fit == "crop":
        return frame[top:top + eh, left:left + ew]
    return np.pad(frame, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")


# -------------------------------------------------------------------------------------------- demo


def _untiled_encode(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode().cpu()


def _untiled_decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample.cpu()


def _tiled(op: str, vae, x, tile, budget, mode):
    fn = api.encode if op == "encode" else api.decode
    return fn(vae, x, tile, budget, mode, output_device="cpu")


def sample_image(size: int | tuple[int, int] | None = None) -> np.ndarray:
    """The bundled sample picture as (H, W, 3) uint8, resized to ``size`` if given."""
    from importlib import resources

    from PIL import Image

    with resources.as_file(resources.files("quadtree_vae") / "assets" / "sample.png") as p, Image.open(p) as im:
        im = im.convert("RGB")
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else size
            im = im.resize((w, h), Image.LANCZOS)
        return np.asarray(im).copy()


def moving_shapes(frames: int, size: int) -> np.ndarray:
    """A short clip (T, H, W, 3) uint8 of a disc and a square moving over a gradient."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    clip = np.empty((frames, size, size, 3), dtype=np.float32)
    for t in range(frames):
        phase = t / max(1, frames - 1)
        img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.7 - 0.4 * xx * yy], -1)
        cx, cy = 0.25 + 0.5 * phase, 0.5 + 0.25 * math.sin(2 * math.pi * phase)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.15**2)[..., None]
        img = np.where(disc, np.array([0.9, 0.25, 0.2], np.float32), img)
        sx, sy = 0.75 - 0.45 * phase, 0.25
        square = ((np.abs(xx - sx) < 0.1) & (np.abs(yy - sy) < 0.1))[..., None]
        img = np.where(square, np.array([0.15, 0.2, 0.6], np.float32), img)
        clip[t] = img
    return (clip * 255 + 0.5).astype(np.uint8)


def cmd_demo(args, out: _Out) -> int:
    size = args.size
    if size % 16 or size < 64:
        raise InvalidInputError(f"demo --size {size}: use a multiple of 16 of at least 64 (the clip is half of it)")
    if args.tile is not None and min((args.tile,) * 2 if isinstance(args.tile, int) else args.tile) < 16:
        raise InvalidInputError(f"--tile {args.tile}: the minimum tile side is 16 px")
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"--out {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    layout_path = media.check_output(folder / DEMO_LAYOUT, args.force, (".png",))
    _check_budget(args)
    cuda = str(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    own_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _demo(args, out, layout_path, cuda, torch.get_num_threads())
    finally:
        torch.set_num_threads(own_threads)


def _demo(args, out: _Out, layout_path: Path, cuda: bool, threads: int | None) -> int:
    from . import measure as m

    size = args.size
    vae, info = _load(args, out)
    temporal = _temporal(info)
    if temporal and (args.frames - 1) % 4:
        t = args.frames
        raise InvalidInputError(f"demo --frames {t}: this VAE takes 1+4k frames, e.g. {t - (t - 1) % 4 or 1} or "
                                f"{t + 4 - (t - 1) % 4}")
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    half = size // 2

    image = sample_image(size)
    clip = moving_shapes(args.frames, half)
    xi = media.to_tensor(image[None])  # (1, 3, H, W)
    xc = media.to_tensor(clip)  # (T, 3, h, w)
    if temporal:
        xi = xi.unsqueeze(2)
        xc = xc.permute(1, 0, 2, 3).unsqueeze(0)
    cases = [("image", f"{size}x{size}", xi, args.tile or size // 2),
             ("clip", f"{args.frames}x{half}x{half}", xc, args.tile or half // 2)]
    budget = args.budget

    out.result(f"qvae demo: {info['spec']} ({info['class']}, {info['params'] / 1e6:.1f}M parameters), "
               f"{str(dtype).removeprefix('torch.')} on "
               f"{device}" + ("" if cuda else f", {threads} thread(s)") + f", mode {args.mode}")
    if info["random"]:
        out.result(RANDOM_NOTE)
    rows = []
    layout_plan = None
    started = time.perf_counter()
    for name, dims, x, tile in cases:
        x = x.to(device=device, dtype=dtype)
        tile_arg = tile if budget is None or args.tile is not None else None
        z_plan = api.plan(vae, x.shape, tile_arg, budget, args.mode, op="encode")

        def run(label, fn, *fargs, _name=name, _dims=dims):
            out.note_start(f"  {_name} {_dims} {label} ...")
            res, sec, peak = m.measure(fn, *fargs, device=device)
            out.note(f" {m.fmt_seconds(sec)}, peak {fmt_bytes(peak)}")
            return res, sec, peak

        zu, tu, pu = run("encode untiled", _untiled_encode, vae, x)
        zt, tt, pt = run(f"encode tiled ({z_plan.tiles} tiles)", _tiled, "encode", vae, x, tile_arg, budget,
                         args.mode)
        rows.append((name, dims, "encode", tile_arg, z_plan.tiles, _maxdiff(zt, zu), tu, tt, pu, pt))
        zin = zu.to(device=device, dtype=dtype)
        y_plan = api.plan(vae, zin.shape, tile_arg, budget, args.mode, op="decode")
        if layout_plan is None:
            layout_plan = y_plan
        yu, tu, pu = run("decode untiled", _untiled_decode, vae, zin)
        yt, tt, pt = run(f"decode tiled ({y_plan.tiles} tiles)", _tiled, "decode", vae, zin, tile_arg, budget,
                         args.mode)
        rows.append((name, dims, "decode", tile_arg, y_plan.tiles, _maxdiff(yt, yu), tu, tt, pu, pt))

    from .plot import draw_layout

    im = draw_layout(layout_plan, image)
    with media.atomic_path(layout_path, args.force) as tmp:
        im.save(tmp, format="PNG")
    total = time.perf_counter() - started

    out.result("")
    out.result(_demo_table(rows, m.fmt_seconds))
    out.result("")
    out.result("max |diff|: largest absolute difference between the tiled and the untiled output "
               f"({'exact mode: float rounding only' if args.mode == 'exact' else 'fast mode: approximate'}); "
               "peak: " + ("CUDA memory allocated above the start" if cuda else
                           "resident memory added during the run (RSS high-water mark)"))
    out.result(f"layout: {layout_path} (decode of the {size}x{size} image)")
    out.result(f"total {m.fmt_seconds(total)}")
    return 0


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.nan
    return float((a.double() - b.double()).abs().max())


def _demo_table(rows, fmt_seconds) -> str:
    head = ("input", "size", "op", "tile", "tiles", "max |diff|", "untiled", "tiled", "untiled peak", "tiled peak")
    body = []
    for name, dims, op, tile, tiles, diff, tu, tt, pu, pt in rows:
        tile_s = "budget" if tile is None else (str(tile) if isinstance(tile, int) else f"{tile[0]}x{tile[1]}")
        body.append((name, dims, op, tile_s, str(tiles), f"{diff:.2e}", fmt_seconds(tu), fmt_seconds(tt),
                     fmt_bytes(pu), fmt_bytes(pt)))
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    left = {0, 1, 2}

    def line(r):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
