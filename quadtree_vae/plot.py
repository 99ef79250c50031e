"""Draw a plan's tile layout over an image (or a blank canvas of the image's size) with Pillow.

The tiles drawn are those of the plan's image-resolution segment: the segment with the most tiles
among those that read or write the image-sized tensor (for an encode, the first segments; for a
decode, the last). Each tile's core is a translucent numbered rectangle; a thin outline around
it shows the widest halo the segment reads. A caption under the picture names the segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .planner import Plan, Segment, fmt_bytes

# distinct, colour-blind-friendly hues (Okabe-Ito), cycled
_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
            (204, 121, 167), (120, 120, 120))
_MIN_SIDE, _MAX_SIDE = 384, 2048


def image_size(plan: Plan) -> tuple[int, int]:
    """(height, width) of the image side of ``plan``: its input for an encode, its output for a decode."""
    shape = plan.in_shape if plan.op == "encode" else plan.out_shape
    return int(shape[-2]), int(shape[-1])


def image_segment(plan: Plan) -> tuple[int, Segment]:
    """(index, segment) of the image-resolution segment whose tiles :func:`draw_layout` draws."""
    size = image_size(plan)
    best: tuple[int, Segment] | None = None
    for i, s in enumerate(plan.segments):
        if s.is_global or size not in (s.size_in, s.size_out):
            continue
        if best is None or len(s.layout) > len(best[1].layout):
            best = (i, s)
    if best is None:  # no local segment at image size: the largest tiled one
        local = [(i, s) for i, s in enumerate(plan.segments) if not s.is_global] or list(enumerate(plan.segments))
        best = max(local, key=lambda p: (p[1].size_out[0] * p[1].size_out[1], len(p[1].layout)))
    return best


def draw_layout(plan: Plan, image=None, *, segment: int | None = None):
    """A ``PIL.Image`` of the tiles of ``plan``'s image-resolution segment (or of ``segment``) over
    ``image`` (a PIL image or an (H, W, 3) uint8 array, resized to the plan's size if it differs),
    or over a blank canvas."""
    from PIL import Image, ImageDraw

    h, w = image_size(plan)
    if segment is None:
        index, seg = image_segment(plan)
    else:
        index, seg = segment, plan.segments[segment]
    base = _canvas(image, h, w)
    scale = min(max(1.0, _MIN_SIDE / max(h, w)), _MAX_SIDE / max(h, w)) if max(h, w) > 0 else 1.0
    W, H = max(1, round(w * scale)), max(1, round(h * scale))
    base = base.resize((W, H), Image.NEAREST if scale >= 1 else Image.LANCZOS).convert("RGBA")

    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    gy, gx = seg.size_out  # the layout lives in the segment's output grid
    sy, sx = H / gy, W / gx
    halo_y = seg.halo * H / max(1, seg.size_in[0])
    halo_x = seg.halo * W / max(1, seg.size_in[1])
    font = _font(max(10, min(48, round(min(H, W) / 20))))
    for k, r in enumerate(seg.layout):
        c = _COLOURS[k % len(_COLOURS)]
        x0, x1, y0, y1 = r.x[0] * sx, r.x[1] * sx, r.y[0] * sy, r.y[1] * sy
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(*c, 70), outline=(*c, 255), width=max(2, round(scale)))
        if seg.halo:
            hx0, hy0 = max(0.0, x0 - halo_x), max(0.0, y0 - halo_y)
            hx1, hy1 = min(W - 1.0, x1 - 1 + halo_x), min(H - 1.0, y1 - 1 + halo_y)
            draw.rectangle([hx0, hy0, hx1, hy1], outline=(*c, 160), width=1)
        label = str(k)
        box = draw.textbbox((0, 0), label, font=font)
        tw, th = box[2] - box[0], box[3] - box[1]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if tw + 4 < x1 - x0 and th + 4 < y1 - y0:
            draw.rectangle([cx - tw / 2 - 3, cy - th / 2 - 3, cx + tw / 2 + 3, cy + th / 2 + 3], fill=(0, 0, 0, 140))
            draw.text((cx - tw / 2 - box[0], cy - th / 2 - box[1]), label, fill=(255, 255, 255, 255), font=font)
    out = Image.alpha_composite(base, overlay).convert("RGB")
    return _caption(out, _caption_lines(plan, index, seg), scale)


def _canvas(image, h: int, w: int):
    from PIL import Image

    if image is None:
        arr = np.full((h, w, 3), 240, dtype=np.uint8)
        step = max(8, 8 * (max(h, w) // 256))  # a faint grid so empty areas read as a canvas
        arr[::step, :] = 230
        arr[:, ::step] = 230
        return Image.fromarray(arr, "RGB")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)), "RGB")
    image = image.convert("RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.LANCZOS)
    return image


def _caption_lines(plan: Plan, index: int, seg: Segment) -> Sequence[str]:
    names = seg.names[0] if len(seg.names) == 1 else f"{seg.names[0]} .. {seg.names[-1]}"
    h, w = image_size(plan)
    return (
        f"{plan.op} {w}x{h} with {plan.network}: segment {index} ({names})",
        f"{len(seg.layout)} tiles on a {seg.size_out[1]}x{seg.size_out[0]} grid, halo {seg.halo} px, "
        f"tile peak {fmt_bytes(seg.peak)}; plan peak {fmt_bytes(plan.peak)}, {plan.tiles} tiles in all",
    )


def _caption(im, lines: Sequence[str], scale: float):
    from PIL import Image, ImageDraw

    font = _font(max(12, min(28, round(im.width / 32))))
    probe = ImageDraw.Draw(im)
    pad = 6
    wrapped = [part for line in lines for part in _wrap(probe, line, font, im.width - 2 * pad)]
    heights = [probe.textbbox((0, 0), line or " ", font=font)[3] for line in wrapped]
    band = sum(heights) + pad * (len(wrapped) + 1)
    out = Image.new("RGB", (im.width, im.height + band), (255, 255, 255))
    out.paste(im, (0, 0))
    draw = ImageDraw.Draw(out)
    y = im.height + pad
    for line, lh in zip(wrapped, heights):
        draw.text((pad, y), line, fill=(20, 20, 20), font=font)
        y += lh + pad
    return out


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        trial = f"{current} {word}" if current else word
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    lines.append(current)
    return lines


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()
