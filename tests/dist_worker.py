"""One rank of a tile-parallel test run, launched by torchrun from tests/test_distributed.py.

``python -m torch.distributed.run --nproc_per_node N dist_worker.py OUT`` runs every case of ``cases()``
under a gloo group (torchrun's rendezvous on 127.0.0.1) and saves {case: result} and the bytes received
to OUT/rank{RANK}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import qwen_tiny, sd_tiny, video, wan22_tiny, wan_tiny

import quadtree_vae as qv


def latent(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cases():
    """name -> (model builder, op, input, keyword options). The test recomputes the same inputs."""
    return {
        "wan_decode": (wan_tiny, "decode", latent(1, 4, 3, 5, 7), {}),
        "wan_decode_tiles": (wan_tiny, "decode", latent(1, 4, 2, 5, 7, seed=1), {"tile": 24}),
        # Wan 2.2: the upsampler's DupUp3D join reads the level's input, kept from an earlier segment
        "wan22_decode_tiles": (wan22_tiny, "decode", latent(1, 8, 2, 6, 8, seed=9), {"tile": 48}),
        "qwen_decode_tiles": (qwen_tiny, "decode", latent(1, 4, 2, 4, 6, seed=5), {"tile": 24}),
        "wan_encode": (wan_tiny, "encode", video(1, 5, 32, 48), {}),
        "wan_encode_tiles": (wan_tiny, "encode", video(1, 5, 32, 48, seed=2), {"tile": 24}),
        "sd_encode": (sd_tiny, "encode", video(2, 1, 32, 48)[:, :, 0], {}),
        "sd_encode_tiles": (sd_tiny, "encode", video(1, 1, 48, 40, seed=3)[:, :, 0], {"tile": 16}),
        "sd_decode_tiles": (sd_tiny, "decode", latent(1, 4, 5, 7, seed=2), {"tile": (16, 24)}),
        "sd_decode_dst": (sd_tiny, "decode", latent(1, 4, 4, 6, seed=3), {"tile": 24, "dst": 0}),
        "sd_decode_thin": (sd_tiny, "decode", latent(1, 4, 2, 1, seed=4), {"progress": True}),
        # the streaming API: windows of 1 and 2 latent frames, chunks of 1, 3, 2, 3 frames
        "wan_decode_frames": (wan_tiny, "decode_frames", latent(1, 4, 3, 5, 7, seed=6), {"tile": 24, "window": 1}),
        "wan_decode_frames_dst": (wan_tiny, "decode_frames", latent(1, 4, 3, 5, 7, seed=7), {"window": 2, "dst": 0}),
        "wan_encode_frames": (wan_tiny, "encode_frames", video(1, 9, 32, 48, seed=8), {"tile": 24, "window": 1}),
    }


def streamed(vae, op: str, x: torch.Tensor, **opts) -> torch.Tensor | None:
    """The chunks of ``qv.decode_frames`` / ``qv.encode_frames`` put together (None: none came)."""
    chunks = [x[:, :, a:b] for a, b in ((0, 1), (1, 4), (4, 6), (6, 9))] if op == "encode_frames" else None
    pieces = list(getattr(qv, op)(vae, chunks if chunks is not None else x, **opts))
    return torch.cat(pieces, dim=2) if pieces else None


def run_rank(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE and the rendezvous come from torchrun
    rank = dist.get_rank()
    models = {}
    results, received = {}, 0
    for name, (build, op, x, opts) in cases().items():
        vae = models.setdefault(build, build())
        ranks = qv.Ranks(dist.group.WORLD, dst=opts.pop("dst", None))
        if opts.get("progress"):  # each rank counts its own tiles, up to its own total
            seen = []
            opts["progress"] = lambda done, total, seen=seen: seen.append((done, total))
        if op.endswith("_frames"):
            results[name] = streamed(vae, op, x, group=ranks, **opts)
        else:
            results[name] = getattr(qv, op)(vae, x, group=ranks, **opts)
        if opts.get("progress"):
            assert seen[-1][0] == seen[-1][1] == len(seen) - 1, seen
        received += ranks.received
    try:  # ranks that disagree on the input's shape: an error on every rank, not a hang
        qv.decode(models[sd_tiny], latent(1, 4, 4, 4 + rank), group=dist.group.WORLD)
        results["mismatch"] = None
    except qv.InvalidInputError as e:
        results["mismatch"] = str(e)
    torch.save({"results": results, "received": received}, out / f"rank{rank}.pt")
    dist.destroy_process_group()



if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
