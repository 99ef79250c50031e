"""Generate quadtree_vae/assets/sample.png: a deterministic, text-free test picture.

Smooth gradients, soft and hard-edged shapes, rings and a fine checkerboard, so that a VAE
round trip shows both smooth areas and detail. Pure numpy math (no randomness), rendered at 2x and
downsampled for anti-aliased edges. Run from the repository root:

    python tools/make_sample.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 384
SS = 2  # supersampling


def render(size: int) -> np.ndarray:
    n = size * SS
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / n  # [0, 1)
    # background: a diagonal two-colour gradient with a soft vignette
    t = (xx + yy) / 2
    sky = np.array([0.16, 0.32, 0.62])
    sand = np.array([0.93, 0.72, 0.42])
    img = (1 - t)[..., None] * sky + t[..., None] * sand
    r0 = np.hypot(xx - 0.5, yy - 0.5)
    img *= (1 - 0.35 * r0**2)[..., None]

    def paint(mask: np.ndarray, colour) -> None:
        nonlocal img
        m = np.clip(mask, 0, 1)[..., None]
        img = img * (1 - m) + m * np.asarray(colour)

    # a soft sun
    paint(np.exp(-(((xx - 0.74) ** 2 + (yy - 0.24) ** 2) / 0.006)), (1.0, 0.92, 0.55))
    # a hard-edged disc with a radial shade
    d = np.hypot(xx - 0.3, yy - 0.62)
    paint((d < 0.17).astype(float), (0.82, 0.2, 0.24))
    paint(((d < 0.17) * np.clip(1 - d / 0.17, 0, 1) * 0.5), (1.0, 0.6, 0.6))
    # concentric rings (increasing frequency outwards)
    rr = np.hypot(xx - 0.72, yy - 0.7)
    rings = (rr < 0.2) * (0.5 + 0.5 * np.cos(2 * np.pi * (rr * 12 + (rr * 9) ** 2)))
    paint(rings * 0.9, (0.1, 0.45, 0.3))
    # a rotated square
    u = (xx - 0.22) * np.cos(0.5) + (yy - 0.24) * np.sin(0.5)
    v = -(xx - 0.22) * np.sin(0.5) + (yy - 0.24) * np.cos(0.5)
    paint(((np.abs(u) < 0.1) & (np.abs(v) < 0.1)).astype(float), (0.25, 0.2, 0.55))
    # a triangle
    tri = (yy < 0.95) & (yy - 0.72 > 2.2 * np.abs(xx - 0.52) - 0.02) & (yy > 0.74)
    paint(tri.astype(float) * 0.85, (0.95, 0.95, 0.9))
    # a fine checkerboard strip along the top edge
    check = ((np.floor(xx * 96) + np.floor(yy * 96)) % 2) * (yy < 0.06) * (xx > 0.4)
    paint(check, (0.05, 0.05, 0.05))
    # thin lines of increasing width
    for i, w in enumerate((0.002, 0.004, 0.008)):
        paint((np.abs(xx - (0.05 + 0.04 * i)) < w) * (yy > 0.42) * (yy < 0.92), (0.98, 0.98, 0.98))
    return np.clip(img, 0, 1)


def main() -> None:
    arr = (render(SIZE) * 255 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr, "RGB").reduce(SS)
    out = Path(__file__).resolve().parents[1] / "quadtree_vae" / "assets" / "sample.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes, {im.width}x{im.height})")


if __name__ == "__main__":
    main()
