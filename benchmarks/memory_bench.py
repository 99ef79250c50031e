"""Benchmark: memory vs clip length, Wan 2.1 (full default config, seeded random weights, float32).

For latent lengths T = 3, 11, 21, 31 (1 + 4(T-1) frames) at 128x128, decode and encode with:

- ``untiled``: ``vae.decode(z).sample`` / ``vae.encode(x).latent_dist.mode()``;
- ``diffusers``: the same after ``vae.enable_tiling()`` with 64-px tiles (stride 48), so it tiles at 128 px;
- ``ours``: ``qv.decode`` / ``qv.encode`` at ``--tile`` (and ``--budget``);
- ``qvae`` (decode only): ``qvae decode z.safetensors -o out.mp4`` run through the command's ``main``.

Each figure comes from its own Python process. Its peak memory is the increment of the peak
resident set (``VmHWM``, reset first) over the resident size once the model is built and the
input made (for ``qvae``: once the command has loaded the latent file and the model), so it
counts the working set and the output, not the weights. Errors are max abs against ``untiled``
(the ``qvae`` output goes through a lossy codec and has none). Seconds are one run after a
warm-up on a 1-frame 8x8 latent (64x64 pixels).

``--clip-rss`` instead runs the real ``qvae decode`` command (a subprocess) on a long and a
short clip of random latents at the same size and compares their whole peak resident sets
(``wait4``'s ``ru_maxrss``) less the latent tensor, which the command holds by design.

    python benchmarks/memory_bench.py                          # the table (about 50 minutes on 2 CPU cores)
    python benchmarks/memory_bench.py --ops decode --frames 3,11 --methods untiled,ours
    python benchmarks/memory_bench.py --clip-rss               # 241 vs 41 frames, 128x128
    python benchmarks/memory_bench.py --clip-rss --vae random:wan2.1:tiny --tile 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build, diffusers_tiling, make_input  # noqa: E402

import quadtree_vae as qv  # noqa: E402
from quadtree_vae import cli, media  # noqa: E402
from quadtree_vae.measure import peak_tracker  # noqa: E402
from quadtree_vae.planner import fmt_bytes  # noqa: E402

METHODS = ("untiled", "diffusers", "ours", "qvae")
LATENT_CHANNELS = 16
SPATIAL = 8  # Wan 2.1's spatial factor


def shape_of(op: str, t_latent: int, size: int) -> tuple[int, ...]:
    if op == "decode":
        return (1, LATENT_CHANNELS, t_latent, size // SPATIAL, size // SPATIAL)
    return (1, 3, 1 + 4 * (t_latent - 1), size, size)


def call_for(vae, op: str, method: str, tile: int, budget: str | None):
    """The measured call: input tensor -> output tensor."""
    if method in ("untiled", "diffusers"):
        if method == "diffusers":
            diffusers_tiling(vae, tile)
        return (lambda x: vae.encode(x).latent_dist.mode()) if op == "encode" else (lambda z: vae.decode(z).sample)
    fn = qv.encode if op == "encode" else qv.decode
    return lambda x: fn(vae, x, tile=tile, budget=budget)


def child(spec: dict, save: str) -> dict:
    """One in-process figure: build, warm up, then track the call."""
    op, method, shape = spec["op"], spec["method"], tuple(spec["shape"])
    if method == "qvae":
        return child_cli(spec, save)
    vae = build("wan2.1", "cpu", tiny=False)
    fn = call_for(vae, op, method, spec["tile"], spec["budget"])
    x = make_input(op, shape, "cpu")
    small = (*shape[:2], 1, *((8, 8) if op == "decode" else (64, 64)))
    with torch.no_grad():
        fn(make_input(op, small, "cpu"))
        with peak_tracker("cpu") as peak:
            t0 = time.perf_counter()
            y = fn(x)
            seconds = time.perf_counter() - t0
    torch.save(y, save)
    return {"seconds": seconds, "peak": peak.bytes}


def child_cli(spec: dict, save: str) -> dict:
    """``qvae decode`` through ``cli.main``, its peak tracked from the moment the model is loaded."""
    stack = contextlib.ExitStack()
    peak = None
    load = cli._load

    def loaded(*args, **kwargs):
        nonlocal peak
        result = load(*args, **kwargs)
        peak = stack.enter_context(peak_tracker("cpu"))
        return result

    cli._load = loaded
    argv = ["decode", spec["latent"], "-o", save, "--vae", "random:wan2.1", "--tile", str(spec["tile"]), "-q",
            "--force"] + (["--budget", spec["budget"]] if spec["budget"] else [])
    t0 = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - t0
    stack.close()
    if code:
        raise SystemExit(f"qvae {' '.join(argv)} exited with {code}")
    return {"seconds": seconds, "peak": peak.bytes}


def spawn(spec: dict, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--save", str(save)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode:
        raise RuntimeError(f"{cmd}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def save_random_latent(path: Path, shape: tuple[int, ...], fps: int = 16) -> int:
    """Random latents (seeded) as ``qvae encode`` would write them; returns the tensor's bytes."""
    z = make_input("decode", shape, "cpu")
    media.save_latent(path, z, {"fps": str(fps), "random_weights": True}, force=True)
    return z.numel() * z.element_size()


def table(args: argparse.Namespace) -> None:
    ops = args.ops.split(",")
    lengths = [int(t) for t in args.frames.split(",")]
    methods = [m for m in args.methods.split(",") if m in METHODS]
    rows = []
    header = "| op | T latent | frames | method | peak RSS increment | seconds (busy machine) | max abs err |"
    print(f"Wan 2.1 full config, float32, {args.size}x{args.size}, tile {args.tile}, budget {args.budget or 'none'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for op in ops:
            for t in lengths:
                shape = shape_of(op, t, args.size)
                latent = Path(tmp) / f"z{t}.safetensors"
                if op == "decode":
                    save_random_latent(latent, shape)
                ref = None
                for method in methods:
                    if method == "qvae" and op != "decode":
                        continue
                    out = Path(tmp) / (f"{method}.mp4" if method == "qvae" else f"{method}.pt")
                    spec = dict(op=op, method=method, shape=shape, tile=args.tile, budget=args.budget,
                                latent=str(latent))
                    r = spawn(spec, out)
                    err = None
                    if method != "qvae":
                        y = torch.load(out)
                        ref = y if method == "untiled" else ref
                        err = None if ref is None else (y.double() - ref.double()).abs().max().item()
                    row = dict(op=op, t_latent=t, frames=1 + 4 * (t - 1), method=method, size=args.size,
                               tile=args.tile, budget=args.budget, peak=r["peak"], seconds=r["seconds"], max_abs=err)
                    rows.append(row)
                    print(f"| {op} | {t} | {row['frames']} | {method} | {fmt_bytes(r['peak'])} | {r['seconds']:.1f} | "
                          f"{'-' if err is None else f'{err:.1e}'} |", flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(rows, indent=1))


def clip_rss(args: argparse.Namespace) -> None:
    """Peak resident set of ``qvae decode`` for a long and a short clip, less the latent tensor."""
    short, long = (int(n) for n in args.clip_frames.split(","))
    rows = []
    print(f"qvae decode -> .mp4, {args.vae}, {args.size}x{args.size}, tile {args.tile or 'auto'}, "
          f"budget {args.budget or 'none'}\n")
    print("| frames | latent | latent bytes | peak RSS | peak RSS less latent | seconds (busy machine) |")
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for frames in (short, long):
            if (frames - 1) % 4:
                raise SystemExit(f"--clip-frames: {frames} is not 1 + 4k")
            shape = shape_of("decode", 1 + (frames - 1) // 4, args.size)
            latent = Path(tmp) / f"z{frames}.safetensors"
            nbytes = save_random_latent(latent, shape)
            cmd = [sys.executable, "-m", "quadtree_vae", "decode", str(latent), "-o", str(Path(tmp) / "out.mp4"),
                   "--vae", args.vae, "-q", "--force"]
            cmd += ["--tile", str(args.tile)] if args.tile else []
            cmd += ["--budget", args.budget] if args.budget else []
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
            rss = usage.ru_maxrss * 1024
            rows.append(dict(frames=frames, latent=list(shape), latent_bytes=nbytes, peak_rss=rss,
                             less_latent=rss - nbytes, seconds=seconds, vae=args.vae, size=args.size, tile=args.tile))
            print(f"| {frames} | {'x'.join(map(str, shape))} | {fmt_bytes(nbytes)} | {fmt_bytes(rss)} | "
                  f"{fmt_bytes(rss - nbytes)} | {seconds:.1f} |", flush=True)
    ratio = rows[1]["less_latent"] / rows[0]["less_latent"]
    print(f"\nratio {long} / {short} frames, less the latent: {ratio:.3f} (target <= 1.10)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="decode,encode", help="comma-separated decode,encode")
    ap.add_argument("--frames", default="3,11,21,31", help="latent lengths T (pixel frames 1 + 4(T-1))")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--size", type=int, default=128, help="frame side in pixels (default %(default)s)")
    ap.add_argument("--tile", type=int, default=64, help="tile of ours and of diffusers' tiling (default %(default)s; "
                                                             "0: qvae's own, --clip-rss only)")
    ap.add_argument("--budget", default=None, help="budget for ours and qvae, e.g. 1GB (default: none)")
    ap.add_argument("--clip-rss", action="store_true", help="qvae decode of a long vs a short clip")
    ap.add_argument("--clip-frames", default="41,241", help="short,long pixel frames for --clip-rss")
    ap.add_argument("--vae", default="random:wan2.1", help="--vae of qvae for --clip-rss")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.save)))
    elif args.clip_rss:
        clip_rss(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
