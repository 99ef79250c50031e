"""The ``qvae`` command: encode, decode, roundtrip, inspect and demo.

Argument parsing and the commands only: the conventions are in ``EPILOG`` (``qvae --help``);
fitting inputs to the model is in :mod:`.fitting`, latent files in :mod:`.latents`, streaming
from file to file in :mod:`.transcode`, ``inspect``'s plans in :mod:`.inspection`, output in
:mod:`.console`, the demo in :mod:`.demo` and PSNR/SSIM in :mod:`.metrics`. Every check that can
be made is made before the model runs; errors print ``error: <message>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import torch

from . import __version__, adapters, api, dataset, demo, inspection, latents, media, transcode
from .archs import ARCHES
from .console import RANDOM_NOTE, Console, TileBar, describe_frames, encoded_frames, plural, progress_enabled, vae_line
from .errors import InvalidInputError, QuadtreeVAEError
from .fitting import FITS
from .metrics import psnr, ssim
from .options import FRAMES, MODES, Options, parse_device

DEFAULT_VAE = "random:wan2.1"
_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
EPILOG = """\
conventions:
  --vae defaults to random:wan2.1: the full Wan 2.1 architecture with seeded random
    weights; outputs made with random weights say so (stderr and latent metadata).
  sides not multiples of the model's spatial factor (8 for Wan 2.1 and SD) are
    refused unless --fit crop (centre crop) or --fit pad (edge padding, cropped off
    again on decode).
  video VAEs take 1+4k frames (Wan 2.1; the factor is the model's): other counts are
    refused unless --frames trim or --frames pad (the copies are dropped again on
    decode). fps and the original frame count are kept in the latent metadata.
  a 2-D (SD-family) VAE encodes a video frame by frame: latents (T, C, h, w).
  latents are raw latent_dist.mode() values (no scaling_factor), key "latent".
  outputs are written atomically and never overwrite a file without --force.
  exit status: 0 ok, 2 bad input / unsupported model / load error, 1 other errors.

Run 'qvae COMMAND --help' for a command's flags."""


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
                        f"{', '.join(ARCHES)} (default: %(default)s, random weights)")
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
    g.add_argument("--mode", choices=MODES, default="exact",
                   help="exact: equal to the untiled model; fast: less memory, GroupNorm statistics "
                        "estimated from a subsampled pass (approximate, SD family)")
    o = common.add_argument_group("output")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes (warnings still show)")
    o.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    fit = argparse.ArgumentParser(add_help=False)
    f = fit.add_argument_group("input fitting")
    f.add_argument("--frames", choices=FRAMES, default=None,
                   help="a video whose frame count the video VAE does not take (1+4k for Wan 2.1): refuse "
                        "(error, default), trim the extra frames, or pad by repeating the last frame (decode "
                        "drops the copies)")
    f.add_argument("--fit", choices=FITS, default=None,
                   help="sides that are not multiples of the model's spatial factor: refuse (default), "
                        "centre-crop down, or pad up by repeating the edge (decode crops the padding off)")

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
                       description="Encode an image or a video into a latent file (key 'latent', with metadata). "
                                   "A .safetensors file with a float tensor 'pixels' (B, C, [T,] H, W) in [-1, 1] "
                                   "is encoded as it is, without the 8-bit step of image files.")
    p.add_argument("input", metavar="INPUT", help="image (.png .jpg .webp ...), video (.mp4 .webm .gif ...) or "
                                                  "pixel tensor (.safetensors with 'pixels')")
    p.add_argument("-o", "--output", required=True, metavar="LATENTS.safetensors")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", parents=[common], help="latents -> image or video",
                       description="Decode a latent file into an image (.png .jpg .webp), a video (.mp4 .webm .gif) "
                                   "or, with -o OUT.safetensors, the decoder's float output as a tensor 'pixels'.")
    p.add_argument("latents", metavar="LATENTS", help="a .safetensors file written by 'qvae encode'")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--fps", type=_fps, default=None,
                   help="frame rate of a video output (default: the rate stored in the latents, else the "
                        "model's: 16 for Wan 2.1, 24 for Wan 2.2)")
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
    p.add_argument("--fit", choices=FITS, default=None, help="as for encode, for sizes the model does not take")
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
    p.add_argument("--out", default=".", metavar="DIR", help=f"folder for {demo.LAYOUT_FILE} (default: current folder)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads for the measured runs (default: torch's default)")
    p.set_defaults(func=cmd_demo)

    dataset.add_parser(sub, parents=[common, fit])
    # No --fallback: the loaders build only the classes the engine tiles (a diffusers folder of any
    # other class is refused, naming it), so running a model untiled could never apply here. The
    # Python API, qv.enable and the ComfyUI nodes keep fallback="full" for model objects of any class.
    parser.set_defaults(fallback="error")
    return parser


# ------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (status 2)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    out = Console(args.quiet)

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


def _load(args, out: Console):
    from .loading import describe, fingerprint, parse_vae_spec

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae = parse_vae_spec(args.vae, device=device, dtype=args.dtype, arch=args.arch)
    info = describe(vae)
    info["facts"] = adapters.facts(vae)  # the loaders only build classes the adapters tile
    info["fingerprint"] = fingerprint(vae)
    info["spec"] = args.vae if info["random"] else Path(args.vae).name
    info["dtype"] = str(next(vae.parameters()).dtype).removeprefix("torch.")
    out.note(f"vae: {vae_line(info)} [{time.perf_counter() - t0:.1f} s]")
    return vae, info


def _options(args) -> Options:
    """The tiling flags as :class:`Options`, and the device (checked here, before anything is read or loaded)."""
    if args.device is not None:
        parse_device(args.device)
    return Options(args.tile, args.budget, args.mode, output_device="cpu")


def _run_items(op: str, vae, x: torch.Tensor, args, plan=None) -> torch.Tensor:
    """Run the engine item by item over the batch axis (frames already fitted), with one progress bar."""
    items = x.shape[0]
    bar = TileBar(op, progress_enabled(args), parts=items)
    outs = []
    try:
        for k in range(items):
            opts = replace(_options(args), progress=bar.part(k), plan=plan)
            outs.append(api.run_tiled(op, vae, x[k:k + 1], opts))
    finally:
        bar.close()
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _plan_for(vae, op: str, shape: Sequence[int], args):
    """One item's plan, checked (tile/budget/mode/shape, and that its estimated peak fits the budget)."""
    plan = api.plan_for(vae, (1, *tuple(shape)[1:]), _options(args), op=op)
    api.check_budget(plan)
    return plan


def _say_random(info: dict, out: Console) -> None:
    if info["random"]:
        out.warn(RANDOM_NOTE)


# ------------------------------------------------------------------------------------------ commands


def _load_source(args, out: Console, command: str):
    """Read an image or video and load the VAE, refusing a bad input before the model is loaded.

    Returns (path, media, vae, info, model input, metadata, frames as shown to the model).
    """
    src_path, src, vae, info = _open_source(args, out, command)
    if src is None:
        src = media.read_media(src_path, deep=True)
    x, meta, shown = latents.model_input(src, args, info, src_path.name, out)
    return src_path, src, vae, info, x, meta, shown


def _open_source(args, out: Console, command: str, lazy: bool = False):
    """(path, media, vae, info): the input checked and the VAE loaded. With ``lazy``, a video for a
    video VAE is only probed (it is encoded as it is read) and media is None; anything else is read
    whole, before the model is loaded (16-bit greyscale keeps its 16 bits into the model)."""
    src_path = media.check_input(args.input)
    kind = media.kind_of(src_path)
    if kind == "latent":
        raise InvalidInputError(f"{src_path} is a latent file; {command} takes an image or a video "
                                "(use 'qvae decode' for latents)")
    _options(args)
    if kind == "video":
        media.probe_video(src_path)  # a file FFmpeg cannot read is refused before the model loads
        vae, info = _load(args, out)
        streams = lazy and info["facts"].temporal
        return src_path, None if streams else media.read_media(src_path), vae, info
    src = media.read_media(src_path, deep=True)
    vae, info = _load(args, out)
    return src_path, src, vae, info


def cmd_encode(args, out: Console) -> int:
    dest = media.check_output(args.output, args.force, (media.LATENT_EXT,), inputs=(args.input,))
    if media.holds_pixels(args.input):
        return _encode_tensor(args, dest, out)
    src_path, src, vae, info = _open_source(args, out, "encode", lazy=True)
    t0 = time.perf_counter()
    if src is None:
        z, meta, size = _encode_video(vae, info, src_path, args, out)
    else:
        x, meta, _ = latents.model_input(src, args, info, src_path.name, out)
        plan = _plan_for(vae, "encode", x.shape, args)  # validates tile/budget/shape before the heavy work
        t0 = time.perf_counter()
        z = _run_items("encode", vae, x, args, plan)
        size = src.size
    meta = {**latents.metadata(info, z, args, src_path), **meta}
    media.save_latent(dest, z, meta, force=args.force)
    what = encoded_frames(meta) if meta["kind"] == "video" else "image"
    out.note(f"wrote {dest}: latent {tuple(z.shape)} {meta['dtype']} from {what} {size[0]}x{size[1]}"
             + (f" at {meta['fps']} fps" if "fps" in meta else "") + f" [{time.perf_counter() - t0:.1f} s]")
    _say_random(info, out)
    return 0


def _encode_tensor(args, dest: Path, out: Console) -> int:
    """``qvae encode PIXELS.safetensors``: a float pixel tensor, encoded as it is (exact, no 8-bit step)."""
    _options(args)
    src_path = media.check_input(args.input)
    x = media.load_pixels(src_path)
    vae, info = _load(args, out)
    meta = latents.tensor_input(x, info, src_path.name)
    plan = _plan_for(vae, "encode", x.shape, args)
    t0 = time.perf_counter()
    z = _run_items("encode", vae, x, args, plan)
    media.save_latent(dest, z, {**latents.metadata(info, z, args, src_path), **meta}, force=args.force)
    out.note(f"wrote {dest}: latent {tuple(z.shape)} from pixels {tuple(x.shape)} [{time.perf_counter() - t0:.1f} s]")
    _say_random(info, out)
    return 0


def _encode_video(vae, info: dict, path: Path, args, out: Console) -> tuple[torch.Tensor, dict, tuple[int, int]]:
    """Encode a video as it is read (:mod:`.transcode`). The frame rule needs the count up front:
    the container's (or its packets'), checked before the model runs; the metadata records the
    frames actually read. Returns (latents, metadata, frame size)."""
    (h, w), count, fps = media.probe_video(path)
    fit = latents.input_fitting(h, w, count, fps, True, args, info, path.name)
    for n in fit.notes:
        out.note(n)
    plan = _plan_for(vae, "encode", (1, 3, count + fit.added, *fit.size), args)
    opts = replace(_options(args), frames=args.frames or "error")
    bar = TileBar("encode", progress_enabled(args))
    try:
        z, seen = transcode.encode_video(vae, path, fit.pixels, info["facts"].temporal_factor, opts, plan,
                                         count + fit.added, bar)
    finally:
        bar.close()
    if seen != count:  # the container's count was off: record what was encoded
        fit = latents.input_fitting(h, w, seen, fps, True, args, info, path.name)
    return z, fit.meta, (h, w)


def cmd_decode(args, out: Console) -> int:
    dest = media.check_output(args.output, args.force, media.IMAGE_WRITE + media.VIDEO_WRITE + (media.LATENT_EXT,),
                              inputs=(args.latents,))
    src = media.check_input(args.latents)
    if media.kind_of(src) != "latent":
        raise InvalidInputError(f"{src}: decode takes a latent file ({media.LATENT_EXT}); to encode and decode an "
                                f"image or video use 'qvae roundtrip'")
    _options(args)
    z, meta, notes = media.load_latent(src)
    for n in notes:
        out.note(n)
    vae, info = _load(args, out)
    latents.check_decodable(z, meta, info, src, dest, out)
    plan = _plan_for(vae, "decode", z.shape, args)
    video = dest.suffix.lower() in media.VIDEO_WRITE
    fps = args.fps or media.fps_from_meta(media.meta_value(meta, "fps"))
    if video and fps is None:
        fps = Fraction(info["facts"].fps)
        out.note(f"no frame rate in {src.name}: writing {fps} fps (set one with --fps)")
    t0 = time.perf_counter()
    if dest.suffix.lower() == media.LATENT_EXT:  # the decoder's float output as it is (no 8-bit step, no --fit undo)
        y = _run_items("decode", vae, z, args, plan)
        media.save_pixels(dest, y, {"vae": info["spec"], "source": src.name}, force=args.force)
        out.note(f"wrote {dest}: pixels {tuple(y.shape)} {str(y.dtype).removeprefix('torch.')} "
                 f"[{time.perf_counter() - t0:.1f} s]")
        _say_random(info, out)
        return 0
    bar = TileBar("decode", progress_enabled(args), parts=z.shape[0])
    try:
        facts = info["facts"]
        count = z.shape[0] * (facts.image_frames(z.shape[2]) if z.dim() == 5 else 1)  # before undoing any padding
        frames = latents.restored(transcode.decoded(vae, z, _options(args), plan, facts.temporal, bar), meta,
                                  count, out)
        written, size = transcode.write_frames(dest, frames, fps if video else None, args.force)
    finally:
        bar.close()
    out.note(f"wrote {dest}: {describe_frames(written, *size, fps if video else None)} "
             f"[{time.perf_counter() - t0:.1f} s]")
    _say_random(info, out)
    return 0


def cmd_roundtrip(args, out: Console) -> int:
    dest = media.check_output(args.output, args.force, media.IMAGE_WRITE + media.VIDEO_WRITE, inputs=(args.input,))
    src_path, src, vae, info, x, meta, shown = _load_source(args, out, "roundtrip")
    if shown.shape[0] > 1 and dest.suffix.lower() in media.IMAGE_WRITE:
        raise InvalidInputError(f"{src_path.name} has {shown.shape[0]} frames, which do not fit in {dest.suffix}; "
                                f"write a video ({', '.join(media.VIDEO_WRITE)})")
    media.check_frame_size(dest, *shown.shape[1:3])  # the output has the input's size (--fit pad is undone)
    enc_plan = _plan_for(vae, "encode", x.shape, args)  # both plans are checked before the heavy work
    dec_plan = _plan_for(vae, "decode", enc_plan.out_shape, args)
    t0 = time.perf_counter()
    z = _run_items("encode", vae, x, args, enc_plan)
    t1 = time.perf_counter()
    y = _run_items("decode", vae, z, args, dec_plan)
    t2 = time.perf_counter()
    frames = latents.restore(latents.frames_of(y, info["facts"].temporal), meta, Console(True))
    fps = src.fps if src.is_video else None
    media.write_media(dest, frames, fps, force=args.force)
    p, s = psnr(shown, frames), ssim(shown, frames)
    out.note(f"wrote {dest}: {describe_frames(*frames.shape[:3], fps)}; latent {tuple(z.shape)} "
             f"[encode {t1 - t0:.1f} s, decode {t2 - t1:.1f} s]")
    out.result(f"PSNR {p:.2f} dB  SSIM {s:.4f}  ({plural(frames.shape[0], 'frame')}, 8-bit RGB, before the "
               f"output file's codec)")
    _say_random(info, out)
    return 0


# ---------------------------------------------------------------------------------------- inspect


def cmd_inspect(args, out: Console) -> int:
    inputs = (args.input,) if args.input else ()
    plot = media.check_output(args.plot, args.force, (".png",), inputs) if args.plot else None
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
            (h0, w0), t0, picture = media.probe(src)
            size = size or (h0, w0)
            frames = frames or t0
    if size is None and latent_shape is None:
        raise InvalidInputError("inspect: give --size HxW (e.g. --size 720x1280) or an input file")
    budget = _options(args).budget
    vae, info = _load(args, Console(True))
    out.result(f"vae: {vae_line(info)}")
    inspection.report(vae, info, args, out, budget, size, frames, picture, latent_shape, plot)
    return 0


# -------------------------------------------------------------------------------------------- demo


def cmd_demo(args, out: Console) -> int:
    layout_path = demo.layout_path(args)
    _options(args)
    return demo.command(args, out, lambda: _load(args, out), layout_path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
