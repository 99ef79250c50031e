"""Shared test models: the real diffusers classes with small seeded random weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from quadtree_vae.geometry import grid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # reference data, made as fixtures/README.md says
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], ranks: int = 2, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torchrun --nproc_per_node ranks`` on 127.0.0.1, one thread per rank."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def seeded(cls, seed: int = 0, **config):
    """An eval-mode model of ``cls`` whose random weights depend only on ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(**config).eval()


def wan_tiny(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLWan

    config = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
    config.update(overrides)
    return seeded(AutoencoderKLWan, seed, **config)


def qwen_tiny(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLQwenImage

    config = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
    config.update(overrides)
    return seeded(AutoencoderKLQwenImage, seed, **config)


TI2V = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_spatial=16)  # the released Wan 2.2 TI2V-5B VAE config


def wan22_tiny(seed: int = 0, **overrides):
    """Wan 2.2's TI2V architecture (residual levels, 2x2 patchify) at tiny widths."""
    from diffusers import AutoencoderKLWan

    config = dict(TI2V, base_dim=8, decoder_base_dim=16, z_dim=8)
    config.update(overrides)
    return seeded(AutoencoderKLWan, seed, **config)


def sd_tiny(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    config = dict(
        block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8, latent_channels=4,
    )
    config.update(overrides)
    n = len(config["block_out_channels"])
    config["down_block_types"] = ("DownEncoderBlock2D",) * n
    config["up_block_types"] = ("UpDecoderBlock2D",) * n
    return seeded(AutoencoderKL, seed, **config)


def flux2_tiny(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLFlux2

    config = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=8)
    config.update(overrides)
    return seeded(AutoencoderKLFlux2, seed, **config)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def untiled_encode(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode()


def untiled_decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


def video(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth-ish random clip in [-1, 1] (random noise plus a gradient, so values vary in space)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, w)[None, None, None, None, :] * torch.linspace(1, -1, h)[:, None]
    x = 0.5 * torch.rand(b, 3, t, h, w, generator=g) - 0.25 + ramp
    return x.clamp(-1, 1)


def model_state(vae) -> dict:
    """Everything that tiling must leave as it found it: attributes, hooks and weights of every module."""
    state = {}
    for name, m in vae.named_modules():
        state[name] = (
            sorted(vars(m).keys()),
            len(m._forward_hooks), len(m._forward_pre_hooks),
            {k: (v.dtype, v.device, v.data_ptr()) for k, v in m.named_parameters(recurse=False)},
        )
    return state


@pytest.fixture(scope="session")
def wan():
    return wan_tiny()


@pytest.fixture(scope="session")
def qwen():
    return qwen_tiny(seed=1)


@pytest.fixture(scope="session")
def sd():
    return sd_tiny()


def random_layouts(data, plan):
    """``plan`` with a random grid (unequal cells, any positions) for every tiled segment."""
    layouts = {}
    for i, seg in enumerate(plan.segments):
        if not seg.is_global:
            h, w = seg.size_out
            ys = data.draw(st.lists(st.integers(1, h - 1), max_size=2)) if h > 1 else []
            xs = data.draw(st.lists(st.integers(1, w - 1), max_size=3)) if w > 1 else []
            layouts[i] = grid(h, w, ys, xs)
    return plan.with_layouts(layouts)
