"""Key maps from release file layouts that diffusers cannot read on its own, with configs read off the weights.

* The original Wan 2.2 layout (``Wan2.2_VAE.pth``, ComfyUI's ``wan2.2_vae.safetensors``): levels
  nest their blocks (``encoder.downsamples.<level>.downsamples.<block>.residual.<n>``), and the
  12-channel first conv shows the 2x2 patchify. diffusers' single-file loader only knows Wan 2.1.
* The Flux.2 ``ae.safetensors`` layout: the ldm/sgm layout with the quant convs inside the
  encoder/decoder (``encoder.quant_conv``, ``decoder.post_quant_conv``) and a batch norm ``bn.*``
  over the patchified latents.

Each map renames keys only (the tensors are the same objects) and refuses keys it does not know,
so that no weight is silently dropped.

The release files hold no config, so the architecture of every original layout (Wan 2.1 / Qwen-Image,
Wan 2.2, ldm/sgm, Flux.2) is read off the tensor shapes here: widths, depths, latent channels and
factors, starting from the arch's shipped config (:func:`quadtree_vae.archs.arch_config`). This is
what lets shrunk test models load, and what diffusers' single-file loader does not do (it takes the
released config as is).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from . import archs
from .errors import LoadError

WAN22_NESTED = re.compile(r"^(encoder\.downsamples\.\d+\.downsamples\.|decoder\.upsamples\.\d+\.upsamples\.)")
IMAGE_CHANNELS = 3  # Wan 2.2 patchifies RGB frames: 3 * patch^2 input channels

# Inside a Wan residual block: index in its ``residual`` Sequential -> diffusers' name.
_RESIDUAL = {"0": "norm1", "2": "conv1", "3": "norm2", "6": "conv2"}
_TOP = {  # keys outside the levels: original prefix -> diffusers prefix
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "encoder.conv1.": "encoder.conv_in.",
    "decoder.conv1.": "decoder.conv_in.",
    "encoder.head.0.": "encoder.norm_out.",
    "encoder.head.2.": "encoder.conv_out.",
    "decoder.head.0.": "decoder.norm_out.",
    "decoder.head.2.": "decoder.conv_out.",
    "encoder.middle.0.": "encoder.mid_block.resnets.0.",
    "encoder.middle.1.": "encoder.mid_block.attentions.0.",
    "encoder.middle.2.": "encoder.mid_block.resnets.1.",
    "decoder.middle.0.": "decoder.mid_block.resnets.0.",
    "decoder.middle.1.": "decoder.mid_block.attentions.0.",
    "decoder.middle.2.": "decoder.mid_block.resnets.1.",
}
_LEVEL = re.compile(r"^(encoder|decoder)\.(?:down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.+)$")


def is_wan22(sd: Mapping[str, Any]) -> bool:
    """Whether Wan-layout weights are Wan 2.2's: nested level keys, a patchified first conv
    (3 x 2^2 input channels) or a 48-channel latent (the encoder head gives mean and log-variance)."""
    if any(WAN22_NESTED.match(k) for k in sd):
        return True
    conv_in, head = sd.get("encoder.conv1.weight"), sd.get("encoder.head.2.weight")
    patchified = conv_in is not None and conv_in.ndim == 5 and conv_in.shape[1] == IMAGE_CHANNELS * 4
    return patchified or (head is not None and head.shape[0] == 2 * 48)


def _block_part(rest: str) -> str:
    """``residual.<n>.<param>`` / ``shortcut.<param>`` inside a residual block -> diffusers' names."""
    m = re.fullmatch(r"residual\.(\d+)\.(.+)", rest)
    if m and m.group(1) in _RESIDUAL:
        return f"{_RESIDUAL[m.group(1)]}.{m.group(2)}"
    if rest.startswith("shortcut."):
        return "conv_shortcut." + rest[len("shortcut.") :]
    raise KeyError(rest)


def _level_blocks(sd: Mapping[str, Any], side: str) -> dict[int, dict[int, set[str]]]:
    """level -> block index -> kinds of entries (``residual``, ``shortcut``, ``resample``, ``time_conv``)."""
    levels: dict[int, dict[int, set[str]]] = {}
    for k in sd:
        m = _LEVEL.match(k)
        if m and m.group(1) == side:
            kind = m.group(4).split(".")[0]
            levels.setdefault(int(m.group(2)), {}).setdefault(int(m.group(3)), set()).add(kind)
    return levels


def _is_resampler(kinds: set[str]) -> bool:
    return bool(kinds & {"resample", "time_conv"})


def wan22_to_diffusers(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename original Wan 2.2 keys to ``AutoencoderKLWan(is_residual=True)`` keys; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    resamplers = {
        side: {
            lvl: max(b for b, kinds in blocks.items() if _is_resampler(kinds))
            for lvl, blocks in _level_blocks(sd, side).items()
            if any(_is_resampler(kinds) for kinds in blocks.values())
        }
        for side in ("encoder", "decoder")
    }
    for key, value in sd.items():
        try:
            out[_wan22_key(key, resamplers)] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise LoadError(
            f"{source}: Wan 2.2 keys with no place in diffusers' AutoencoderKLWan: {', '.join(unknown[:5])}"
            + (f" ... ({len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    return out


def _wan22_key(key: str, resamplers: Mapping[str, Mapping[int, int]]) -> str:
    m = _LEVEL.match(key)
    if m:
        side, level, block, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        base = f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{level}"
        if resamplers[side].get(level) == block:
            if not rest.startswith(("resample.", "time_conv.")):
                raise KeyError(key)
            return f"{base}.{'downsampler' if side == 'encoder' else 'upsampler'}.{rest}"
        return f"{base}.resnets.{block}.{_block_part(rest)}"
    for old, new in _TOP.items():
        if key.startswith(old):
            rest = key[len(old) :]
            return new + (_block_part(rest) if ".resnets." in new else rest)
    raise KeyError(key)


def wan22_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """``AutoencoderKLWan`` constructor arguments read off original Wan 2.2 weights.

    Widths, depth and temporal downsampling come from the encoder's levels; the decoder width from
    its head; z_dim from ``conv2`` (the post-quant conv, z -> z); the patch from the first conv's
    input channels (3 * patch^2).
    """

    def need(key: str) -> torch.Tensor:
        return _need(sd, key, source, "Wan 2.2")

    conv_in, dec_head = need("encoder.conv1.weight"), need("decoder.head.2.weight")
    base_dim, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    z_dim = int(need("conv2.weight").shape[0])
    patch = math.isqrt(in_channels // IMAGE_CHANNELS)
    if patch * patch * IMAGE_CHANNELS != in_channels:
        raise LoadError(f"{source}: encoder.conv1 takes {in_channels} channels, not 3 x patch^2")
    levels = _level_blocks(sd, "encoder")
    if sorted(levels) != list(range(len(levels))) or not levels:
        raise LoadError(f"{source}: Wan 2.2 encoder levels {sorted(levels)} are not 0..n-1")
    widths, depths, temporal = [], set(), []
    for lvl in sorted(levels):
        blocks = levels[lvl]
        res = sorted(b for b, kinds in blocks.items() if not _is_resampler(kinds))
        depths.add(len(res))
        widths.append(int(need(f"encoder.downsamples.{lvl}.downsamples.{res[-1]}.residual.6.weight").shape[0]))
        if lvl < len(levels) - 1:
            temporal.append(any("time_conv" in kinds for kinds in blocks.values()))
    if len(depths) != 1 or any(w % base_dim for w in widths):
        raise LoadError(f"{source}: inconsistent Wan 2.2 encoder levels (widths {widths}, blocks {sorted(depths)})")
    dim_mult = [w // base_dim for w in widths]
    return {
        "base_dim": base_dim,
        "decoder_base_dim": int(dec_head.shape[1]) // dim_mult[0],
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": depths.pop(),
        "temperal_downsample": temporal,
        "is_residual": True,
        "in_channels": in_channels,
        "out_channels": int(dec_head.shape[0]),
        "patch_size": patch if patch > 1 else None,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** len(temporal) * patch,
    }


# ------------------------------------------------------------------------------------------ Flux.2

FLUX2_ANCHORS = ("bn.running_mean", "encoder.quant_conv.weight", "decoder.post_quant_conv.weight")
_FLUX2_MOVED = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


def is_flux2(sd: Mapping[str, Any]) -> bool:
    """Whether ldm-layout keys are Flux.2's (quant convs inside encoder/decoder, or the latent batch norm)."""
    return any(k in sd for k in FLUX2_ANCHORS)


def flux2_to_ldm(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a Flux.2 ``ae.safetensors`` state dict into plain ldm keys and diffusers' ``bn.*`` keys.

    The ldm part is what diffusers' ldm converter reads (quant convs at the top level, as in SD);
    the batch norm statistics keep their names in ``AutoencoderKLFlux2``.
    """
    ldm, bn = {}, {}
    for key, value in sd.items():
        if key.startswith("bn."):
            bn[key] = value
            continue
        for old, new in _FLUX2_MOVED.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        ldm[key] = value
    if bn and "bn.num_batches_tracked" not in bn:  # a counter for training; eval outputs never read it
        bn["bn.num_batches_tracked"] = torch.tensor(0)
    return ldm, bn


def flux2_config(bn: Mapping[str, torch.Tensor], latent_channels: int, source: str = "state dict") -> dict[str, Any]:
    """The Flux.2-only constructor arguments: the latent patch (from the batch norm's width)."""
    if "bn.running_mean" not in bn:
        return {"patch_size": [2, 2]}
    folded = int(bn["bn.running_mean"].shape[0])
    patch = math.isqrt(folded // latent_channels)
    if patch * patch * latent_channels != folded:
        raise LoadError(f"{source}: bn over {folded} channels is not {latent_channels} latent channels x patch^2")
    return {"patch_size": [patch, patch]}


# --------------------------------------------------------------------------------------------------
# architectures read off the weights of the original layouts
# --------------------------------------------------------------------------------------------------


def _need(sd: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise LoadError(f"{source}: {what} weights lack {key!r}, which is needed to infer the architecture")
    return sd[key]


def wan21_config(sd: Mapping[str, torch.Tensor], arch: str, source: str) -> dict[str, Any]:
    what = "Wan-layout"
    conv_in = _need(sd, "encoder.conv1.weight", source, what)
    head = _need(sd, "encoder.head.2.weight", source, what)
    dec_head = _need(sd, "decoder.head.2.weight", source, what)
    base_dim, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    z_dim = int(head.shape[0]) // 2
    out_channels, dec_width = int(dec_head.shape[0]), int(dec_head.shape[1])

    # Walk encoder.downsamples.<i>: residual blocks, closed by a resample (with time_conv when the
    # level also halves time). This gives dim_mult, num_res_blocks and temperal_downsample.
    kinds: dict[int, set[str]] = {}
    for k in sd:
        m = re.match(r"encoder\.downsamples\.(\d+)\.([A-Za-z_]+)", k)
        if m:
            kinds.setdefault(int(m.group(1)), set()).add(m.group(2))
    levels: list[tuple[int, int]] = []  # (residual blocks, width) per level
    temporal: list[bool] = []
    count, width = 0, base_dim
    for i in sorted(kinds):
        ks = kinds[i]
        if "residual" in ks:
            count += 1
            width = int(_need(sd, f"encoder.downsamples.{i}.residual.6.weight", source, what).shape[0])
        elif "resample" in ks:
            levels.append((count, width))
            temporal.append("time_conv" in ks)
            count = 0
        else:
            raise LoadError(
                f"{source}: Wan-layout VAE with attention inside the encoder's down blocks "
                f"(encoder.downsamples.{i}); diffusers' Wan VAE does not support attn_scales"
            )
    if count:
        levels.append((count, width))
    if not levels:
        raise LoadError(f"{source}: Wan-layout weights have no encoder.downsamples.* blocks")
    blocks = {c for c, _ in levels}
    if any(w % base_dim for _, w in levels) or len(blocks) != 1:
        raise LoadError(f"{source}: inconsistent Wan encoder levels {levels} (base width {base_dim})")
    num_res_blocks = blocks.pop()
    dim_mult = [w // base_dim for _, w in levels]
    if len(levels) != 4 or num_res_blocks != 2:
        raise LoadError(
            f"{source}: Wan-layout VAE with {len(levels)} levels of {num_res_blocks} residual blocks; diffusers' "
            f"convert_wan_vae_to_diffusers maps only the released layout (4 levels of 2 blocks)"
        )
    decoder_base_dim = dec_width // dim_mult[0]

    config = archs.arch_config(arch)
    update: dict[str, Any] = {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "temperal_downsample": temporal,
    }
    if arch == "qwen-image":
        if out_channels != in_channels or decoder_base_dim != base_dim:
            raise LoadError(
                f"{source}: AutoencoderKLQwenImage needs equal in/out channels and encoder/decoder widths; "
                f"this file has {in_channels}->{out_channels} channels, widths {base_dim}/{decoder_base_dim}"
            )
        update["input_channels"] = in_channels
    else:
        update.update(
            decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            scale_factor_temporal=2 ** sum(temporal),
            scale_factor_spatial=2 ** len(temporal),
        )
    if len(config.get("latents_mean") or []) != z_dim:
        # The shipped statistics belong to the 16-channel release; a different width has none.
        update["latents_mean"] = [0.0] * z_dim
        update["latents_std"] = [1.0] * z_dim
    config.update(update)
    return config


def wan22_full_config(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The released Wan 2.2 config with the widths, depths and factors read off the weights."""
    config = archs.arch_config("wan2.2")
    config.update(wan22_config(sd, source))
    if len(config["latents_mean"]) != config["z_dim"]:  # the shipped statistics belong to z_dim 48
        config["latents_mean"] = [0.0] * config["z_dim"]
        config["latents_std"] = [1.0] * config["z_dim"]
    return config


def _norm_groups(channels: list[int]) -> int:
    """ldm's Normalize always uses 32 groups; narrower test models fall back to the largest
    power-of-two divisor of 32 that divides every width (the files do not record the count)."""
    groups = 32
    while groups > 1 and any(c % groups for c in channels):
        groups //= 2
    return groups


def ldm_config(sd: Mapping[str, torch.Tensor], arch: str, source: str) -> dict[str, Any]:
    what = "ldm-layout"
    enc_in = _need(sd, "encoder.conv_in.weight", source, what)
    dec_in = _need(sd, "decoder.conv_in.weight", source, what)
    dec_out = _need(sd, "decoder.conv_out.weight", source, what)
    down = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    up = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))})
    if not down or down != list(range(len(down))) or up != down:
        raise LoadError(
            f"{source}: ldm-layout weights have inconsistent block indices (encoder.down {down}, decoder.up {up})"
        )
    attn = [k for k in sd if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]
    if attn:
        raise LoadError(
            f"{source}: ldm-layout VAE with attention in its down/up blocks (e.g. {attn[0]!r}); "
            f"diffusers' AutoencoderKL has none there"
        )
    block_out = [int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", source, what).shape[0]) for i in down]
    # Count complete blocks (those with a conv1), so one stray key cannot change the depth.
    layers = len({m.group(1) for k in sd if (m := re.fullmatch(r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight", k))})
    n = len(block_out)
    config = archs.arch_config(arch)
    config.update(
        in_channels=int(enc_in.shape[1]),
        out_channels=int(dec_out.shape[0]),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=block_out,
        layers_per_block=layers,
        latent_channels=int(dec_in.shape[1]),
        norm_num_groups=_norm_groups(block_out),
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention=any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in sd),
    )
    return config
