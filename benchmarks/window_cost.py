"""Where the time of a tiled Wan 2.1 clip decode goes: untiled vs time windows vs whole clip per tile.

One process, one run each after a small warm-up: the model's own ``vae.decode``, ``qv.decode`` with
the plan as made (windows of one latent frame) and with ``plan.with_window(None)`` (each tile runs
the whole clip, no windows), with the plan's estimated work beside them.

    python benchmarks/window_cost.py                 # 1x16x11x16x16 latent (128x128, 41 frames), tile 64
    python benchmarks/window_cost.py --frames 3 --tile 128
"""

from __future__ import annotations

import argparse
import time

import torch

import quadtree_vae as qv
from quadtree_vae.loading import random_vae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=11, help="latent frames (default %(default)s)")
    ap.add_argument("--side", type=int, default=16, help="latent side (default %(default)s: 128 px)")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vae = random_vae("wan2.1")
    z = torch.randn(1, 16, args.frames, args.side, args.side, generator=torch.Generator().manual_seed(0))
    plan = qv.plan(vae, z.shape, tile=args.tile)
    runs = {
        "untiled": lambda: vae.decode(z).sample,
        f"windows of {plan.window} latent frame(s)": lambda: qv.decode(vae, z, plan=plan),
        "whole clip per tile": lambda: qv.decode(vae, z, plan=plan.with_window(None)),
    }
    print(f"Wan 2.1 full config, decode {tuple(z.shape)}, tile {args.tile}, {plan.tiles} tiles, "
          f"plan work {plan.overhead:.2f}x untiled, {args.threads} threads\n")
    print("| run | seconds | x untiled |\n|---|---|---|")
    with torch.no_grad():
        qv.decode(vae, z[:, :, :1, :4, :4])  # warm-up
        base = None
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            s = time.perf_counter() - t
            base = base or s
            print(f"| {name} | {s:.1f} | {s / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
