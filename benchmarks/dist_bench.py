"""Benchmark: tile-parallel decode on 2 CPU ranks against DistVAE and against one process.

Wan 2.1 full config (``AutoencoderKLWan()`` with seeded random weights), decode of a 1x16x1x64x64
latent (512x512 image), float32 on CPU. Rows:

- ``untiled``: ``vae.decode(z).sample`` in one process, 2 threads (the reference for the error);
- ``quadtree-vae, 1 process``: ``qv.decode(vae, z)``, 2 threads;
- ``quadtree-vae, 2 ranks``: ``qv.decode(vae, z, group=...)`` under torchrun, gloo, 1 thread a rank;
- ``DistVAE 0.1.0, 2 ranks``: the decoder wrapped by ``distvae.vae.parallel.parallelize_decoder``,
  then ``vae.decode(z).sample``, under torchrun, gloo, 1 thread a rank.

Columns: seconds of the timed call (after an untimed warm-up on an 8x8 latent; for ranks, from a
barrier before the call to one after it); the process's peak resident set per rank (VmHWM, model
and interpreter included) and the peak added by the call (the kernel's high-water mark is reset
first, see quadtree_vae/measure.py); payload bytes each rank received through torch.distributed
(broadcast, send/recv, all_gather, all_reduce, batch_isend_irecv; a broadcast counts once per
receiver, an all_reduce as an all-gather of the other ranks' tensors; the few bytes of pickled
objects are not counted); max abs difference from the untiled output.

    python benchmarks/dist_bench.py      # needs distvae: pip install distvae --no-deps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import quadtree_vae as qv
from quadtree_vae.measure import _status, peak_tracker
from quadtree_vae.planner import fmt_bytes

LATENT = (1, 16, 1, 64, 64)  # --side changes the last two, for a quick check
WARMUP = (1, 16, 1, 8, 8)
ROWS = [  # (role, label, ranks, threads per rank)
    ("untiled", "untiled (reference)", 1, 2),
    ("ours", "quadtree-vae, 1 process", 1, 2),
    ("ours-dist", "quadtree-vae, 2 ranks", 2, 1),
    ("distvae", "DistVAE 0.1.0, 2 ranks", 2, 1),
]


def build() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan().eval()


def latent(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ counting bytes

RECEIVED = [0]


def _count_received() -> None:
    """Wrap torch.distributed's collectives to add up the payload this rank receives."""

    def wrap(name, received):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            RECEIVED[0] += received(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    def others() -> int:
        return dist.get_world_size() - 1

    wrap("broadcast", lambda t, src=None, *a, **k: 0 if dist.get_rank() == src else t.nbytes)
    wrap("recv", lambda t, *a, **k: t.nbytes)
    wrap("all_gather", lambda outs, t, *a, **k: t.nbytes * others())
    wrap("all_reduce", lambda t, *a, **k: t.nbytes * others())
    wrap("batch_isend_irecv", lambda ops: sum(op.tensor.nbytes for op in ops if op.op in (dist.irecv,)))


# ------------------------------------------------------------------------------------ workers


def worker(role: str, out: Path, shape: tuple[int, ...]) -> None:
    """One process (or one rank) of a row: build, warm up, time the decode, write its numbers."""
    distributed = role in ("ours-dist", "distvae")
    if distributed:
        dist.init_process_group("gloo")
        _count_received()
    rank = dist.get_rank() if distributed else 0
    vae = build()
    if role == "distvae":
        from distvae.vae.parallel import parallelize_decoder

        parallelize_decoder(vae, dist.group.WORLD)
        fn = lambda z: vae.decode(z).sample  # noqa: E731
    elif role == "untiled":
        fn = lambda z: vae.decode(z).sample  # noqa: E731
    elif role == "ours":
        fn = lambda z: qv.decode(vae, z)  # noqa: E731
    else:
        fn = lambda z: qv.decode(vae, z, group=dist.group.WORLD)  # noqa: E731
    z = latent(shape)
    with torch.no_grad():
        fn(latent(WARMUP))
        if distributed:
            dist.barrier()
        RECEIVED[0] = 0
        with peak_tracker("cpu") as peak:
            t0 = time.perf_counter()
            y = fn(z)
            if distributed:
                dist.barrier()
            seconds = time.perf_counter() - t0
    stats = {"seconds": seconds, "added": peak.bytes, "hwm": _status("VmHWM"), "received": RECEIVED[0]}
    (out / f"{role}-{rank}.json").write_text(json.dumps(stats))
    if rank == 0:
        torch.save(y, out / f"{role}.pt")
    if distributed:
        dist.destroy_process_group()


def launch(role: str, ranks: int, threads: int, out: Path, side: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    me = [__file__, "--worker", role, "--out", str(out), "--side", str(side)]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *me]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")


def _each(per_rank: list[dict], key: str) -> str:
    return " / ".join(fmt_bytes(r[key]) for r in per_rank)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, default=LATENT[-1], help="latent side (64: a 512x512 image)")
    ap.add_argument("--json", default="benchmarks/dist_results.json", help="where to write the rows")
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return worker(args.worker, Path(args.out), (*LATENT[:-2], args.side, args.side))

    shape = (*LATENT[:-2], args.side, args.side)
    side = 8 * args.side
    print(f"Wan 2.1 decode {'x'.join(map(str, shape))} -> {side}x{side}, CPU, float32, torch {torch.__version__}\n")
    print("| method | ranks x threads | seconds | peak RSS per rank | added by the call per rank "
          "| received per rank | max abs err |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for role, label, ranks, threads in ROWS:
            launch(role, ranks, threads, out, args.side)
            per_rank = [json.loads((out / f"{role}-{r}.json").read_text()) for r in range(ranks)]
            ref = torch.load(out / "untiled.pt")
            err = (torch.load(out / f"{role}.pt").double() - ref.double()).abs().max().item()
            row = {"method": label, "ranks": ranks, "threads": threads, "per_rank": per_rank, "max_abs": err,
                   "seconds": max(r["seconds"] for r in per_rank)}
            rows.append(row)
            print(f"| {label} | {ranks} x {threads} | {row['seconds']:.2f} | {_each(per_rank, 'hwm')} | "
                  f"{_each(per_rank, 'added')} | {_each(per_rank, 'received') if ranks > 1 else '-'} | {err:.2e} |",
                  flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
