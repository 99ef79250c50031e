"""Benchmark: untiled vs diffusers ``enable_tiling`` vs quadtree-vae, on full-size configs.

Prints a markdown table (seconds, time relative to untiled, peak memory, error vs untiled) and
writes the rows as JSON. Each measurement runs in a fresh Python process, so allocator caches and
earlier peaks of one method cannot flatter or penalise another. Models are the real diffusers
classes with their default (released) widths and seeded random weights.

Peak memory: on CPU the increment of the process's peak resident set over its size just before
the call (the kernel's high-water mark is reset first); on CUDA ``torch.cuda.max_memory_allocated``
above what was allocated before. Seconds are one timed run after an untimed warm-up on a small
input (which also warms the thread pool and kernels). Wall-clock time on a shared 2-core machine
varies by 15-50% from one process to the next, so ``--repeat N`` runs the untiled model and our
modes N times each, interleaved (untiled, exact, fast, untiled, ...), and reports the median; the
ratio is median over median, and "runs" gives the spread. diffusers' tiling, a reference for
memory and error, runs once.

    python benchmarks/bench.py                     # every case (about 25 minutes on 2 CPU cores, before wan22/flux2)
    python benchmarks/bench.py --only wan22,flux2  # families: wan, wan22, qwen, sd, flux2 (comma-separated)
    python benchmarks/bench.py --only sd --methods exact,fast
    python benchmarks/bench.py --only sd --methods exact,fast --repeat 3   # medians of 3 interleaved runs
    python benchmarks/bench.py --only sd --inputs 1x3x512x512 --methods exact --repeat 7
    python benchmarks/bench.py --device cuda
    python benchmarks/bench.py --quick             # tiny widths, half the sides: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import quadtree_vae as qv
from quadtree_vae import adapters
from quadtree_vae.loading import random_vae
from quadtree_vae.measure import peak_tracker
from quadtree_vae.planner import fmt_bytes

# (model, op, input shape, tile, methods)
CASES = [
    ("wan2.1", "encode", (1, 3, 1, 512, 512), 256, ["untiled", "diffusers", "exact"]),
    ("wan2.1", "decode", (1, 16, 1, 64, 64), 256, ["untiled", "diffusers", "exact"]),
    ("wan2.1", "encode", (1, 3, 5, 256, 256), 128, ["untiled", "diffusers", "exact"]),
    ("wan2.1", "decode", (1, 16, 2, 32, 32), 128, ["untiled", "diffusers", "exact"]),
    ("qwen-image", "encode", (1, 3, 1, 512, 512), 256, ["untiled", "diffusers", "exact"]),
    ("qwen-image", "decode", (1, 16, 1, 64, 64), 256, ["untiled", "diffusers", "exact"]),
    ("sd", "encode", (1, 3, 512, 512), 256, ["untiled", "diffusers", "exact", "fast"]),
    ("sd", "decode", (1, 4, 64, 64), 256, ["untiled", "diffusers", "exact", "fast"]),
    ("sd", "encode", (1, 3, 1024, 1024), 256, ["untiled", "diffusers", "exact", "fast"]),
    ("sd", "decode", (1, 4, 128, 128), 256, ["untiled", "diffusers", "exact", "fast"]),
    ("wan2.2", "encode", (1, 3, 1, 512, 512), 256, ["untiled", "diffusers", "exact"]),
    ("wan2.2", "decode", (1, 48, 1, 32, 32), 256, ["untiled", "diffusers", "exact"]),
    ("wan2.2", "encode", (1, 3, 5, 256, 256), 128, ["untiled", "diffusers", "exact"]),
    ("wan2.2", "decode", (1, 48, 2, 16, 16), 128, ["untiled", "diffusers", "exact"]),
    ("flux2", "encode", (1, 3, 512, 512), 256, ["untiled", "diffusers", "exact"]),
    ("flux2", "decode", (1, 32, 64, 64), 256, ["untiled", "diffusers", "exact"]),
]
FAMILIES = {"wan": "wan2.1", "wan22": "wan2.2", "qwen": "qwen-image", "sd": "sd", "flux2": "flux2"}


def build(model: str, device: str, tiny: bool) -> torch.nn.Module:
    """The released config of ``model`` (``random:ARCH``'s defaults: Wan 2.1 / Qwen-Image base_dim 96,
    Wan 2.2 TI2V 160/256/z48 with 2x2 patchify, SD-1.x and Flux.2 128/256/512/512) with seed-0 weights."""
    return random_vae(model, seed=0, tiny=tiny, device=device)


def quick_case(case: tuple) -> tuple:
    """``--quick``: the case at half the sides and half the tile, still several tiles (a run-through on
    the tiny-width models, not a measurement)."""
    model, op, shape, tile, methods = case
    return model, op, (*shape[:-2], shape[-2] // 2, shape[-1] // 2), tile // 2, methods


def make_input(op: str, shape: tuple[int, ...], device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if op == "decode":
        return torch.randn(shape, generator=g).to(device)
    h, w = shape[-2:]
    ramp = torch.linspace(-0.7, 0.7, w) * torch.linspace(1, -1, h)[:, None]
    return (0.6 * torch.rand(shape, generator=g) - 0.3 + ramp).clamp(-1, 1).to(device)


def diffusers_tiling(vae: torch.nn.Module, tile: int) -> None:
    """diffusers' own tiling at the same tile, stride 3/4 of it (its default ratio 256/192)."""
    vae.enable_tiling()
    if hasattr(vae, "tile_sample_min_height"):  # Wan, Qwen-Image
        vae.tile_sample_min_height = vae.tile_sample_min_width = tile
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = tile * 3 // 4
    else:  # AutoencoderKL, AutoencoderKLFlux2: tile size from sample_size, overlap 1/4
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // adapters.facts(vae).spatial_factor
        vae.tile_overlap_factor = 0.25


def method_fn(vae, op: str, method: str, tile: int):
    if method == "untiled" or method == "diffusers":
        if method == "diffusers":
            diffusers_tiling(vae, tile)
        if op == "encode":
            return lambda x: vae.encode(x).latent_dist.mode()
        return lambda z: vae.decode(z).sample
    fn = qv.encode if op == "encode" else qv.decode
    return lambda x: fn(vae, x, tile=tile, mode=method)


def child(args: argparse.Namespace) -> None:
    """One measurement: build, warm up on a small input, then time and track the real call."""
    torch.set_num_threads(args.threads)
    model, op, shape, tile, method = json.loads(args.child)
    shape = tuple(shape)
    vae = build(model, args.device, args.quick)
    fn = method_fn(vae, op, method, tile)
    small = list(shape)
    small[-2], small[-1] = (8, 8) if op == "decode" else (64, 64)
    x = make_input(op, shape, args.device)
    with torch.no_grad():
        fn(make_input(op, tuple(small), args.device))
        with peak_tracker(torch.device(args.device)) as peak:
            t0 = time.perf_counter()
            y = fn(x)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    parked = None
    if method in ("exact", "fast"):
        p = qv.plan(vae, shape, tile=tile, mode=method)
        parked = p.cut_bytes if p.park == "device" else None
    torch.save(y.cpu(), args.save)
    print(json.dumps({"seconds": seconds, "peak": peak.bytes, "parked": parked}))


def run_one(case, method: str, args: argparse.Namespace, out: Path) -> dict:
    model, op, shape, tile, _ = case
    cmd = [sys.executable, __file__, "--child", json.dumps([model, op, shape, tile, method]), "--save", str(out),
           "--device", args.device, "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode:
        if method == "untiled":  # nothing to compare with
            raise RuntimeError(f"{cmd}\n{res.stderr[-3000:]}")
        lines = res.stderr.strip().splitlines() or ["no output"]
        return {"error": lines[-1][:200]}  # e.g. diffusers' tiling refusing a model: a row that says so
    return json.loads(res.stdout.strip().splitlines()[-1])


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (a.double() - ref.double()).square().mean().item()
    span = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(span * span / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=_families, help=f"comma-separated families: {', '.join(FAMILIES)}")
    ap.add_argument("--quick", action="store_true", help="tiny widths at half the sides and tile: check that it runs")
    ap.add_argument("--methods", help="comma-separated subset of untiled,diffusers,exact,fast (untiled always runs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--inputs", help="comma-separated input shapes to keep, as the table writes them (1x3x512x512)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of untiled and our modes, interleaved; medians")
    ap.add_argument("--json", default="benchmarks/results.json", help="where to write the rows")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    cases = [c for c in CASES if args.only is None or c[0] in args.only]
    if args.inputs:
        cases = [c for c in cases if "x".join(map(str, c[2])) in args.inputs.split(",")]
    if args.quick:
        cases = [quick_case(c) for c in cases]
    rows = []
    header = ("| model | op | input | tile | method | seconds | x untiled | runs | peak memory | of which parked "
              "| max abs err | PSNR dB |")
    print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}, float32"
          + (f", median of {args.repeat} interleaved runs" if args.repeat > 1 else "")
          + (", --quick (tiny widths: not a measurement)" if args.quick else "") + "\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            rows += measure_case(case, args, Path(tmp))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


def measure_case(case: tuple, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Every method of one case (untiled and ours ``--repeat`` times, interleaved); prints and returns the rows."""
    model, op, shape, tile, methods = case
    if args.methods:
        methods = [m for m in methods if m == "untiled" or m in args.methods.split(",")]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    outputs = {}
    for r in range(max(args.repeat, 1)):
        for m in methods:
            if r and m == "diffusers":
                continue
            path = tmp / f"{m}.pt"
            results[m].append(run_one(case, m, args, path))
            if r == 0:
                outputs[m] = torch.load(path) if "error" not in results[m][0] else None
    ref, base = outputs["untiled"], statistics.median(r["seconds"] for r in results["untiled"])
    rows = []
    for m in methods:
        y, first = outputs[m], results[m][0]
        row = dict(model=model, op=op, input="x".join(map(str, shape)), tile=tile, method=m)
        if y is None:
            rows.append(dict(row, error=first["error"]))
            print(f"| {model} | {op} | {row['input']} | {tile} | {m} | failed: {first['error']} | | | | | | |",
                  flush=True)
            continue
        runs = [r["seconds"] for r in results[m]]
        err = (y.double() - ref.double()).abs().max().item()
        row.update(seconds=statistics.median(runs), runs=runs, ratio=statistics.median(runs) / base,
                   peak=max(r["peak"] for r in results[m]), parked=first["parked"], max_abs=err, psnr=psnr(y, ref))
        rows.append(row)
        db = "inf" if math.isinf(row["psnr"]) else f"{row['psnr']:.1f}"
        spread = f"{min(runs):.1f}-{max(runs):.1f}" if len(runs) > 1 else "1"
        print(f"| {model} | {op} | {row['input']} | {tile} | {m} | {row['seconds']:.2f} | {row['ratio']:.2f} "
              f"| {spread} | {fmt_bytes(row['peak'])} | {fmt_bytes(row['parked'])} | {err:.2e} | {db} |", flush=True)
    return rows


def _families(value: str) -> set[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown family {', '.join(unknown) or value!r}; "
                                         f"choose from {', '.join(FAMILIES)}")
    return {FAMILIES[n] for n in names}


if __name__ == "__main__":
    main()
