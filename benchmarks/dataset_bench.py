"""Benchmark: ``qvae cache`` throughput (items/s) with 1 and 2 ranks on small images and clips.

Writes a folder of images and short clips, then runs ``qvae cache`` on it once per rank count in
a fresh output folder: one rank as a plain process, more under ``torchrun`` (gloo on CPU, one
thread per rank unless ``--threads`` says otherwise). Two rates are printed: "encode" counts from
the first item to the merged index (what ``qvae cache`` itself reports), "wall" includes starting
Python, importing torch and building the VAE on every rank.

    python benchmarks/dataset_bench.py                          # 16 images 128x128 + 4 clips 5x128x128, Wan 2.1
    python benchmarks/dataset_bench.py --vae random:sd --ranks 1 2 4
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from quadtree_vae import media

ROOT = Path(__file__).resolve().parent.parent
RATE = re.compile(r"(\d+) items: .*\[([\d.]+) s, ([\d.]+) items/s\]")


def make_items(folder: Path, images: int, clips: int, size: int, frames: int) -> None:
    """Smooth random pictures (a gradient plus noise) as PNGs and MP4 clips."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 180, size, dtype=np.float32)[None, None, :, None]

    def pixels(t: int) -> np.ndarray:
        return (ramp + rng.integers(0, 75, (t, size, size, 3))).astype(np.uint8)

    for i in range(images):
        media.write_media(folder / f"image{i:03d}.png", pixels(1), None)
    for i in range(clips):
        media.write_media(folder / f"clip{i:03d}.mp4", pixels(frames), 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ranks: int, data: Path, out: Path, args) -> tuple[float, float, int]:
    """(encode seconds, wall seconds, items) of one ``qvae cache`` run with ``ranks`` processes."""
    cache = ["cache", str(data), "-o", str(out), "--vae", args.vae, "-q", "--device", args.device]
    if args.tile:
        cache += ["--tile", str(args.tile)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "quadtree_vae", *cache]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "quadtree_vae", *cache]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = RATE.search(done.stdout)
    if done.returncode != 0 or found is None:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return float(found.group(2)), wall, int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", default="random:wan2.1")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="side of the images and clips (multiple of 8)")
    ap.add_argument("--frames", type=int, default=5, help="frames per clip (1+4k for Wan)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--tile", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qvae-dataset-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        make_items(data, args.images, args.clips, args.size, args.frames)
        print(f"{args.vae}, {args.images} images {args.size}x{args.size} + {args.clips} clips "
              f"{args.frames}x{args.size}x{args.size}, {args.device}, {args.threads} thread(s) per rank")
        print("| ranks | items | encode s | encode items/s | wall s | wall items/s |")
        print("|---|---|---|---|---|---|")
        for n in args.ranks:
            enc, wall, items = run(n, data, Path(tmp) / f"out{n}", args)
            print(f"| {n} | {items} | {enc:.1f} | {items / enc:.2f} | {wall:.1f} | {items / wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
