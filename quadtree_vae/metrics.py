"""Image quality of a round trip: PSNR and SSIM of 8-bit RGB frames."""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays of the same shape (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, size: int = 11) -> float:
    """Mean structural similarity of two (T, H, W, 3) uint8 arrays: Gaussian window (11 px, sigma
    1.5), per RGB channel, constants K1=0.01, K2=0.03, averaged over valid windows, channels and frames."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    h, w = a.shape[1:3]
    size = min(size, h, w)
    size -= 1 - size % 2  # odd
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()
    c1, c2 = 0.01**2, 0.03**2
    total, count = 0.0, 0
    for i in range(0, a.shape[0], 8):
        x = torch.from_numpy(a[i:i + 8]).permute(0, 3, 1, 2).double() / 255
        y = torch.from_numpy(b[i:i + 8]).permute(0, 3, 1, 2).double() / 255

        def blur(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(t, kernel, groups=3)

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        total += float(s.sum())
        count += s.numel()
    return total / count
