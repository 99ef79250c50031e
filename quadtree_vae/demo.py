"""``qvae demo``: the bundled sample image and a generated clip, encoded and decoded tiled and
untiled, with exactness, time and peak memory side by side."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import adapters, api, media
from .console import RANDOM_NOTE
from .errors import InvalidInputError
from .fitting import frames_to_add
from .measure import fmt_seconds, measure
from .planner import fmt_bytes

LAYOUT_FILE = "qvae-demo-layout.png"


def untiled_encode(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode().cpu()


def untiled_decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample.cpu()


def tiled(op: str, vae, x, tile, budget, mode):
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


def layout_path(args) -> Path:
    """Where ``qvae demo`` draws its tile layout, checked (with ``--size``) before anything loads."""
    if args.size % 16 or args.size < 64:
        raise InvalidInputError(
            f"demo --size {args.size}: use a multiple of 16 of at least 64 (the clip is half of it)")
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"--out {folder} is a file, not a folder")
    if not folder.is_dir():  # as every other command: a missing folder is refused, not made
        raise InvalidInputError(f"--out {folder}: the folder does not exist")
    return media.check_output(folder / LAYOUT_FILE, args.force, (".png",))


def command(args, out, load: Callable[[], tuple[nn.Module, dict]], layout: Path) -> int:
    """``qvae demo``: load the VAE with ``load``, check the clip length, run with ``--threads``."""
    cuda = str(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    own_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        vae, info = load()
        facts = adapters.facts(vae)
        if facts.temporal:
            frames_to_add(facts, args.frames, "error", f"demo --frames {args.frames}", "--frames {}")
        return run(args, out, vae, info, layout, cuda, torch.get_num_threads())
    finally:
        torch.set_num_threads(own_threads)


def run(args, out, vae: nn.Module, info: dict, layout_path: Path, cuda: bool, threads: int | None) -> int:
    """Measure tiled against untiled on the sample image and clip; print the table, draw the layout."""
    size = args.size
    temporal = adapters.facts(vae).temporal
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
    plans = []
    for _, _, x, tile in cases:  # every plan is made and checked before the first run
        tile_arg = tile if budget is None or args.tile is not None else None
        z_plan = api.plan(vae, x.shape, tile_arg, budget, args.mode, op="encode")
        y_plan = api.plan(vae, z_plan.out_shape, tile_arg, budget, args.mode, op="decode")
        api.check_budget(z_plan)
        api.check_budget(y_plan)
        plans.append((tile_arg, z_plan, y_plan))
    rows = []
    layout_plan = None
    started = time.perf_counter()
    for (name, dims, x, _), (tile_arg, z_plan, y_plan) in zip(cases, plans):
        x = x.to(device=device, dtype=dtype)

        def run(label, fn, *fargs, _name=name, _dims=dims):
            out.note_start(f"  {_name} {_dims} {label} ...")
            res, sec, peak = measure(fn, *fargs, device=device)
            out.note(f" {fmt_seconds(sec)}, peak {fmt_bytes(peak)}")
            return res, sec, peak

        zu, tu, pu = run("encode untiled", untiled_encode, vae, x)
        zt, tt, pt = run(f"encode tiled ({z_plan.tiles} tiles)", tiled, "encode", vae, x, tile_arg, budget,
                         args.mode)
        rows.append((name, dims, "encode", tile_arg, z_plan.tiles, _maxdiff(zt, zu), tu, tt, pu, pt))
        zin = zu.to(device=device, dtype=dtype)
        if layout_plan is None:
            layout_plan = y_plan
        yu, tu, pu = run("decode untiled", untiled_decode, vae, zin)
        yt, tt, pt = run(f"decode tiled ({y_plan.tiles} tiles)", tiled, "decode", vae, zin, tile_arg, budget,
                         args.mode)
        rows.append((name, dims, "decode", tile_arg, y_plan.tiles, _maxdiff(yt, yu), tu, tt, pu, pt))

    from .plot import draw_layout

    im = draw_layout(layout_plan, image)
    with media.atomic_path(layout_path, args.force) as tmp:
        im.save(tmp, format="PNG")
    total = time.perf_counter() - started

    out.result("")
    out.result(_demo_table(rows, fmt_seconds))
    out.result("")
    out.result("max |diff|: largest absolute difference between the tiled and the untiled output "
               f"({'exact mode: float rounding only' if args.mode == 'exact' else 'fast mode: approximate'}); "
               "peak: " + ("CUDA memory allocated above the start" if cuda else
                           "resident memory added during the run (RSS high-water mark)"))
    out.result(f"layout: {layout_path} (decode of the {size}x{size} image)")
    out.result(f"total {fmt_seconds(total)}")
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
