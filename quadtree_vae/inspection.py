"""``qvae inspect``: the shapes a size, image, video or latent file gives, and their tile plans.

Plans are made without running the model (an estimate from channel counts and regions); a plan
whose estimated peak exceeds the budget is shown with a warning, as ``encode``/``decode`` would
refuse it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import api, media
from .console import RANDOM_NOTE, Console, plural
from .errors import InvalidInputError
from .fitting import fit_pixels, fitted_size, frames_to_add
from .planner import available_memory, fmt_bytes


def report(vae: torch.nn.Module, info: dict, args, out: Console, budget: int | None, size: tuple[int, int] | None,
           frames: int | None, picture: np.ndarray | None, latent_shape: tuple[int, ...] | None,
           plot: Path | None) -> None:
    """Print the input's shapes and the encode/decode plans (``args.op``); draw ``plot`` if given."""
    facts = info["facts"]
    temporal, sf = facts.temporal, facts.spatial_factor
    if info["random"]:
        out.result(f"     ({RANDOM_NOTE})")

    if latent_shape is not None:
        enc_shape = None
        dec_shape = latent_shape if not (temporal and len(latent_shape) == 4) else (
            latent_shape[0], latent_shape[1], 1, *latent_shape[2:])
        h, w = dec_shape[-2] * sf, dec_shape[-1] * sf
        t_lat = dec_shape[2] if len(dec_shape) == 5 else 1
        out.result(f"input: latents {latent_shape} -> image {h}x{w}"
                   + (f", {plural(facts.image_frames(t_lat), 'frame')}" if temporal else ""))
    else:
        h, w = size
        (h, w), _, notes = fitted_size(h, w, sf, args.fit, f"the size {h}x{w}")
        if picture is not None and args.fit:
            fit = fitted_size(*picture.shape[:2], sf, args.fit, "the picture")
            picture = fit_pixels(picture[None], *fit[:2])[0]
        for n in notes:
            out.result(f"note: {n}")
        t = frames or 1
        if temporal:
            added = frames_to_add(facts, t, "pad", "")
            if added:
                out.result(f"note: {t} frames is not 1+{facts.temporal_factor}k: encode needs --frames trim "
                           f"({t - facts.extra_frames(t)}) or --frames pad ({t + added}); planning for {t + added}")
                t += added
            enc_shape = (1, facts.in_channels, t, h, w)
            dec_shape = (1, info["latent_channels"], facts.latent_frames(t), h // sf, w // sf)
        else:
            if t > 1:
                out.result(f"note: a 2-D VAE encodes the {t} frames one by one; the plan is per frame")
            enc_shape = (1, facts.in_channels, h, w)
            dec_shape = (1, info["latent_channels"], h // sf, w // sf)
        out.result(f"input: {h}x{w}" + (f", {plural(t, 'frame')}" if temporal else "") + f" -> latent {dec_shape}")
    device = next(vae.parameters()).device
    limit = (f"budget {fmt_bytes(budget)}" if budget else
             f"no budget: {fmt_bytes(available_memory(device))} free on {device.type}")
    tile = args.tile if args.tile is None or isinstance(args.tile, int) else f"{args.tile[0]}x{args.tile[1]}"
    out.result(f"tiling: tile {tile or 'auto'}, {limit}, mode {args.mode}")

    plans = {}
    if enc_shape is not None and args.op in ("encode", "both"):
        plans["encode"] = api.plan(vae, enc_shape, args.tile, args.budget, args.mode, op="encode")
    if args.op in ("decode", "both") or enc_shape is None:
        plans["decode"] = api.plan(vae, dec_shape, args.tile, args.budget, args.mode, op="decode")
    for name, p in plans.items():
        halo = max(s.halo for s in p.segments)
        out.result("")
        out.result(f"{name}: {p.tiles} tiles in {len(p.segments)} segments, widest halo {halo} px, "
                   f"estimated peak {fmt_bytes(p.peak)}, work {p.overhead:.3f}x untiled")
        out.result(p.describe())
        try:
            api.check_budget(p)
        except InvalidInputError as e:
            out.warn(f"{e}; {name} would refuse to run this plan")
    if plot is not None:
        from .plot import draw_layout, image_segment

        p = plans.get("decode") or plans["encode"]
        if args.op == "encode" and "encode" in plans:
            p = plans["encode"]
        im = draw_layout(p, picture)
        with media.atomic_path(plot, args.force) as tmp:
            im.save(tmp, format="PNG")
        idx, seg = image_segment(p)
        out.result("")
        out.result(f"wrote {plot}: {p.op} segment {idx}, {len(seg.layout)} tiles"
                   + (" over the input" if picture is not None else " on a blank canvas"))
