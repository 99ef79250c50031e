"""SD-family exact mode against untiled, in one process: interleaved timings, or a cProfile.

Timings on a shared machine are noisy, so each method runs ``--repeats`` times interleaved
(untiled, exact, untiled, exact, ...) and the minimum of each is kept; the ratio of minima is far
steadier than one run of each in separate processes (benchmarks/bench.py, which the README table
comes from). The model is bench.py's SD-1.x-size ``AutoencoderKL`` with seeded random weights.

    python benchmarks/profile_sd.py                         # ratio table, 512 encode/decode
    python benchmarks/profile_sd.py --size 512 1024 --methods untiled exact fast
    python benchmarks/profile_sd.py --threads 1 --cpu-time  # steadier when other work shares the CPU
    python benchmarks/profile_sd.py --profile encode        # top functions of one exact call
    python benchmarks/profile_sd.py --threads 1 --ops encode --op-profile  # self CPU per op, untiled vs exact
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build, make_input, method_fn  # noqa: E402

TILE = 256


def shape_of(op: str, size: int) -> tuple[int, ...]:
    return (1, 3, size, size) if op == "encode" else (1, 4, size // 8, size // 8)


def timed(fn, x: torch.Tensor, clock) -> tuple[float, torch.Tensor]:
    t0 = clock()
    y = fn(x)
    return clock() - t0, y


def compare(vae, op: str, size: int, methods: list[str], repeats: int, clock) -> None:
    x = make_input(op, shape_of(op, size), "cpu")
    fns = {m: method_fn(vae, op, m, TILE) for m in methods}
    best = {m: float("inf") for m in methods}
    outs = {}
    for fn in fns.values():  # warm-up on a small input
        fn(make_input(op, shape_of(op, 64), "cpu"))
    for _ in range(repeats):
        for m, fn in fns.items():
            s, outs[m] = timed(fn, x, clock)
            best[m] = min(best[m], s)
    ref = outs[methods[0]]
    for m in methods:
        err = (outs[m].double() - ref.double()).abs().max().item()
        print(f"| {op} | {size} | {m} | {best[m]:.2f} | {best[m] / best[methods[0]]:.3f} | {err:.2e} |", flush=True)


def profile(vae, op: str, size: int, top: int) -> None:
    x = make_input(op, shape_of(op, size), "cpu")
    fn = method_fn(vae, op, "exact", TILE)
    fn(make_input(op, shape_of(op, 64), "cpu"))
    prof = cProfile.Profile()
    prof.enable()
    fn(x)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def op_profile(vae, op: str, size: int, methods: list[str], top: int) -> None:
    """Self CPU time per aten op (torch.profiler) of one call of each method, side by side: where the
    extra time of a tiled run goes (copies, reductions, normalisation) next to the shared convolutions."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = make_input(op, shape_of(op, size), "cpu")
    table: dict[str, dict[str, tuple[float, int]]] = {}
    for m in methods:
        fn = method_fn(vae, op, m, TILE)
        fn(make_input(op, shape_of(op, 64), "cpu"))
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(x)
        table[m] = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    totals = {m: sum(s for s, _ in ops.values()) for m, ops in table.items()}
    keys = sorted({k for ops in table.values() for k in ops}, key=lambda k: -max(t[k][0] for t in table.values()
                                                                                    if k in t))
    print(f"\n{op} {size}: self CPU seconds per op (calls)\n")
    print("| op | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for k in keys[:top]:
        cells = [f"{table[m][k][0]:.3f} ({table[m][k][1]})" if k in table[m] else "-" for m in methods]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print("| total | " + " | ".join(f"{totals[m]:.3f}" for m in methods) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    ap.add_argument("--size", nargs="+", type=int, default=[512], help="image side(s)")
    ap.add_argument("--methods", nargs="+", default=["untiled", "exact"], help="the first is the reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="process CPU time instead of wall time: steadier on a busy machine (best with --threads 1)")
    ap.add_argument("--profile", choices=["encode", "decode"], help="cProfile one exact call instead")
    ap.add_argument("--op-profile", action="store_true",
                    help="self CPU time per aten op (torch.profiler) of each method, one call each")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vae = build("sd", "cpu", tiny=False)
    with torch.no_grad():
        if args.profile:
            return profile(vae, args.profile, args.size[0], args.top)
        if args.op_profile:
            for size in args.size:
                for op in args.ops:
                    op_profile(vae, op, size, args.methods, args.top)
            return
        clock = time.process_time if args.cpu_time else time.perf_counter
        kind = "CPU" if args.cpu_time else "wall"
        print(f"{args.threads} threads, tile {TILE}, {kind} seconds, min of {args.repeats} interleaved runs\n")
        print("| op | size | method | seconds | x first | max abs vs first |\n|---|---|---|---|---|---|")
        for size in args.size:
            for op in args.ops:
                compare(vae, op, size, args.methods, args.repeats, clock)


if __name__ == "__main__":
    main()
