"""Adapter for the causal VAEs of Wan 2.1/2.2 and Qwen-Image 1/2.1.

Classes: ``AutoencoderKLWan`` (Wan 2.1; Wan 2.2 with ``is_residual=True, patch_size=2``),
``AutoencoderKLQwenImage`` and ``AutoencoderKLQwenImage21``. Only describes the network: the
model's own blocks, run with a causal cache that belongs to the tile, and the footprints read off
their convs. Norms are RMS over channels (pointwise), so the only global op is the single-head
attention of the mid blocks. The model streams time itself: the encoder takes one frame, then
chunks of four; the decoder one latent frame at a time (the first with ``first_chunk``).

Wan 2.2 and Qwen-Image 2.1 use residual down/up blocks: each level's resnets and resampler plus a
parameter-free shortcut (``AvgDown3D``: average of 2x2(x2) cells folded into channels;
``DupUp3D``: the reverse, duplicating). A down level is one step run by the model's own
``forward``: the shortcut reads a subset of what the main path reads, and the average pool reads
whole 2x2 cells, so its footprint is its main path widened to even positions (``Aligned``); the
plan cuts after a downsampler anyway. An up level is its resnets and upsampler as separate steps,
with the duplicating shortcut as a join that changes resolution, so the plan can cut before the
upsampler (the decoder's last levels run at the largest sizes, where a wide halo costs most).
Wan 2.2 folds 2x2 pixels into channels before the encoder (``patchify``) and unfolds them after
the decoder; both are steps (space-to-depth = a 2x2 stride-2 footprint, its inverse = 2x upsampling).
Qwen-Image 2.1's causal convs are 2-D convs on a single frame: it takes one frame (T = 1) only.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import torch
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen
from diffusers.models.autoencoders import autoencoder_kl_qwenimage21 as qwen21
from diffusers.models.autoencoders import autoencoder_kl_wan as wan
from torch import nn

from ..engine import Ctx, Network, Step
from ..errors import InvalidInputError
from ..geometry import POINTWISE, Aligned, Conv, Up, chain
from .common import Facts, conv_footprint, conv_work, unsupported, upsample_footprint

MODELS = (wan.AutoencoderKLWan, qwen.AutoencoderKLQwenImage, qwen21.AutoencoderKLQwenImage21)
SINGLE_FRAME = (qwen21.AutoencoderKLQwenImage21,)  # its "causal 3-D" convs are 2-D convs on one frame
RESIDUAL = (wan.WanResidualBlock, qwen.QwenImageResidualBlock, qwen21.QwenImage21ResidualBlock)
ATTENTION = (wan.WanAttentionBlock, qwen.QwenImageAttentionBlock, qwen21.QwenImage21AttentionBlock)
RESAMPLE = (wan.WanResample, qwen.QwenImageResample, qwen21.QwenImage21Resample)
DOWN_LEVEL = (wan.WanResidualDownBlock, qwen21.QwenImage21ResidualDownBlock)
UP_LEVEL = (wan.WanResidualUpBlock, qwen21.QwenImage21ResidualUpBlock)
UP_BLOCK = (wan.WanUpBlock, qwen.QwenImageUpBlock, qwen21.QwenImage21UpBlock)
CACHE_T = wan.CACHE_T
CLASSES = ("AutoencoderKLWan (Wan 2.1, Wan 2.2), AutoencoderKLQwenImage (Qwen-Image), "
           "AutoencoderKLQwenImage21 (Qwen-Image 2.1, single frames)")


def supports(vae: nn.Module) -> bool:
    return isinstance(vae, MODELS)


def check(vae: nn.Module) -> None:
    """Refuse blocks this adapter does not describe (found while describing them, before any work)."""
    patch = patch_size(vae)
    if patch != 1 and vae.encoder.conv_in.in_channels % (patch * patch):
        raise unsupported(vae, f"patch_size={patch} does not divide the {vae.encoder.conv_in.in_channels} "
                               "channels of encoder.conv_in")


def patch_size(vae: nn.Module) -> int:
    """Pixels per side that patchify folds into channels before the encoder (Wan 2.2: 2); 1 if none."""
    return vae.config.get("patch_size") or 1


def facts(vae: nn.Module) -> Facts:
    """2x per spatial level times the patch, 2x per temporally downsampling level.

    Wan 2.1 and Qwen-Image: 8x and 1 + 4k frames. Wan 2.2: 16x (8x levels on 2x2 patches), 1 + 4k
    frames, 3-channel images that the encoder sees as 12 channels. Qwen-Image 2.1: 16x (five
    levels), 4-channel RGBA, one frame per clip (``max_frames``), though its levels would take 1 + 8k.
    """
    cfg = vae.config
    return Facts(type(vae).__name__, 2 ** (len(cfg.dim_mult) - 1) * patch_size(vae), 2 ** sum(cfg.temperal_downsample),
                 in_channels(vae), latent_channels(vae), patch_size=patch_size(vae),
                 max_frames=1 if isinstance(vae, SINGLE_FRAME) else None,
                 **(WAN22_CLIPS if patch_size(vae) > 1 else {}))


WAN22_CLIPS = {"fps": 24, "clip_frames": 121}  # Wan 2.2 (TI2V-5B) makes 121 frames at 24 fps; Wan 2.1 81 at 16


def in_channels(vae: nn.Module) -> int:
    """Channels of the image the user passes (before patchify)."""
    return vae.encoder.conv_in.in_channels // patch_size(vae) ** 2


def latent_channels(vae: nn.Module) -> int:
    return vae.config.z_dim


def _causal_conv(name: str, conv: nn.Module, pre: tuple[nn.Module, ...] = ()) -> Step:
    """A causal conv that the model caches in its encoder/decoder ``forward`` (conv_in, the head)."""

    def fn(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        for m in pre:
            x = m(x)
        prev = ctx.cache[0]
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T and prev is not None:
            keep = torch.cat([prev[:, :, -1:].to(keep.device), keep], dim=2)
        y = conv(x, prev)
        ctx.cache[0] = keep
        return y

    return Step(name, fn, (conv.in_channels, conv.out_channels), conv_footprint(conv), cache_slots=1,
                work=conv_work(conv))


def _resnet_footprint(name: str, block: nn.Module, vae: nn.Module):
    if not isinstance(block.conv_shortcut, nn.Identity) and conv_footprint(block.conv_shortcut) != POINTWISE:
        raise unsupported(vae, f"{name}.conv_shortcut is not a 1x1 conv")
    return chain(conv_footprint(block.conv1), conv_footprint(block.conv2))


def _resample(name: str, block: nn.Module, vae: nn.Module):
    """(footprint, cache slots, frames out per frame in) of a ``Resample``."""
    mode = block.mode
    convs = [m for m in block.resample if isinstance(m, nn.Conv2d)]
    if mode.startswith("downsample"):
        pad = block.resample[0].padding  # the model's own ZeroPad2d in front of the stride-2 conv
        fp = conv_footprint(convs[0], tuple(pad))
    elif mode.startswith("upsample"):
        fp = chain(upsample_footprint(block.resample[0]), conv_footprint(convs[0]))
    else:
        raise unsupported(vae, f"{name} has resample mode {mode!r}")
    scale = {"downsample3d": Fraction(1, 2), "upsample3d": Fraction(2)}.get(mode, Fraction(1))
    return fp, int(mode.endswith("3d")), scale


def _block(name: str, block: nn.Module, vae: nn.Module) -> Step:
    """One entry of the model's block lists, run by its own ``forward`` with the tile's cache."""

    def cached(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return block(x, feat_cache=ctx.cache, feat_idx=[0])

    if isinstance(block, RESIDUAL):
        return Step(name, cached, (block.in_dim, block.out_dim), _resnet_footprint(name, block, vae), cache_slots=2,
                    work=conv_work(block), temporaries=3.0)
    if isinstance(block, ATTENTION):
        return Step(name, lambda x, ctx: block(x), (block.dim, block.dim), is_global=True,
                    work=conv_work(block), temporaries=4.0)
    if isinstance(block, RESAMPLE):
        fp, slots, scale = _resample(name, block, vae)
        out = [m for m in block.resample if isinstance(m, nn.Conv2d)][0].out_channels
        return Step(name, cached, (block.dim, out), fp, cache_slots=slots, time_scale=scale, work=conv_work(block),
                    temporaries=2.5)
    raise unsupported(vae, f"{name} is a {type(block).__name__}, which the Wan/Qwen-Image adapter does not know")


def _level(name: str, level: nn.Module, resampler: nn.Module | None, vae: nn.Module):
    """Footprint of a residual level's main path (resnets, then its resampler), cache slots, time scale."""
    for j, r in enumerate(level.resnets):
        if not isinstance(r, RESIDUAL):
            raise unsupported(vae, f"{name}.resnets.{j} is a {type(r).__name__}")
    fps = [_resnet_footprint(f"{name}.resnets.{j}", r, vae) for j, r in enumerate(level.resnets)]
    slots, scale = 2 * len(fps), Fraction(1)
    if resampler is not None:
        fp, extra, scale = _resample(name, resampler, vae)
        fps.append(fp)
        slots += extra
    return chain(*fps), slots, scale


def _down_level(name: str, level: nn.Module, vae: nn.Module) -> Step:
    """A residual down level: ``resnets -> downsampler`` plus the ``AvgDown3D`` of the level's input.

    The model's own ``forward`` runs it chunk by chunk (the shortcut pads a lone first frame in
    time itself). The shortcut averages whole 2x2 cells, so the tile's input must start and end on
    even positions: the main path's footprint widened to the cell grid.
    """
    main, slots, scale = _level(name, level, level.downsampler, vae)
    pool = level.avg_shortcut
    if (pool.factor_s, Fraction(1, pool.factor_t)) != (main.scale[1], scale):
        raise unsupported(vae, f"{name}.avg_shortcut pools {pool.factor_s}x{pool.factor_t} but the main path "
                               f"resamples {main.scale[1]}x{1 / scale}")
    fp = Aligned(main, pool.factor_s) if pool.factor_s > 1 else main
    c_out = level.resnets[-1].out_dim

    def fn(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return level(x, feat_cache=ctx.cache, feat_idx=[0])

    return Step(name, fn, (level.resnets[0].in_dim, c_out), fp, cache_slots=slots, time_scale=scale,
                work=conv_work(level), temporaries=4.0)


def _up_level(name: str, level: nn.Module, index: int, vae: nn.Module) -> list[Step]:
    """A residual up level as its resnets and upsampler, the ``DupUp3D`` of the level's input joined
    to the upsampler's output (``index``: where the first resnet lands in the step list).

    As separate steps the plan can cut inside the level, before its upsampler, as in Wan 2.1; the
    duplicating shortcut changes resolution, so the join reads the level's input at half the
    output's region. On the first chunk the model drops the shortcut's leading duplicated frame
    (``first_chunk``), as its upsampler does.
    """
    for j, r in enumerate(level.resnets):
        if not isinstance(r, RESIDUAL):
            raise unsupported(vae, f"{name}.resnets.{j} is a {type(r).__name__}")
    steps = [_block(f"{name}.resnets.{j}", r, vae) for j, r in enumerate(level.resnets)]
    dup = level.avg_shortcut
    if (dup is None) != (level.upsampler is None):
        raise unsupported(vae, f"{name} has a shortcut but no upsampler, or the reverse")
    if dup is None:
        return steps
    up = _block(f"{name}.upsampler", level.upsampler, vae)
    if (dup.factor_s, Fraction(dup.factor_t)) != (up.footprint.scale[0], up.time_scale):
        raise unsupported(vae, f"{name}.avg_shortcut duplicates {dup.factor_s}x{dup.factor_t} but the upsampler "
                               f"makes {up.footprint.scale[0]}x{up.time_scale}")

    def shortcut(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return dup(x, first_chunk=ctx.first)

    def join(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return h.add_(skip)

    return [*steps, replace(up, skip=index, join=join, shortcut=shortcut, skip_footprint=Up(dup.factor_s))]


def _patchify(vae: nn.Module) -> Step:
    """Space-to-depth of ``p x p`` pixels into channels, as the model's ``_encode`` does first."""
    p, c = patch_size(vae), in_channels(vae)
    return Step("patchify", lambda x, ctx: wan.patchify(x, p), (c, c * p * p), Conv(p, p))


def _unpatchify(vae: nn.Module) -> Step:
    p, c = patch_size(vae), vae.decoder.conv_out.out_channels
    return Step("unpatchify", lambda x, ctx: wan.unpatchify(x, p), (c, c // (p * p)), Up(p))


def _mid(name: str, mid: nn.Module, vae: nn.Module) -> list[Step]:
    steps = [_block(f"{name}.resnets.0", mid.resnets[0], vae)]
    for i, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            steps.append(_block(f"{name}.attentions.{i}", attn, vae))
        steps.append(_block(f"{name}.resnets.{i + 1}", resnet, vae))
    return steps


def _chunks(vae: nn.Module, first: int, rest: int):
    """How the model streams a clip of ``t`` frames: ``first`` frames, then chunks of ``rest``."""
    name = type(vae).__name__

    def lengths(t: int) -> list[int]:
        if isinstance(vae, SINGLE_FRAME) and t != 1:
            raise InvalidInputError(f"{name} takes one frame (T = 1); got {t} frames")
        return [first] + [rest] * ((t - first) // rest)

    return lengths


def encoder(vae: nn.Module, mode: str = "exact", moments: bool = False) -> Network:
    """patchify, conv_in, down blocks, mid block, head, quant_conv; returns the posterior mean (``mode()``).

    With ``moments`` it returns what the model's ``_encode`` does: mean and log-variance.
    """
    check(vae)
    enc = vae.encoder
    z = 2 * latent_channels(vae) if moments else latent_channels(vae)
    steps = [_patchify(vae)] if patch_size(vae) > 1 else []
    steps.append(_causal_conv("encoder.conv_in", enc.conv_in))
    for i, b in enumerate(enc.down_blocks):
        name = f"encoder.down_blocks.{i}"
        steps.append(_down_level(name, b, vae) if isinstance(b, DOWN_LEVEL) else _block(name, b, vae))
    steps += _mid("encoder.mid_block", enc.mid_block, vae)
    steps.append(_causal_conv("encoder.conv_out", enc.conv_out, (enc.norm_out, enc.nonlinearity)))
    quant = vae.quant_conv
    steps.append(Step("quant_conv", lambda x, ctx: quant(x)[:, :z], (quant.in_channels, z),
                      conv_footprint(quant), work=conv_work(quant)))
    return Network(f"{type(vae).__name__} encoder", steps, in_channels(vae), chunks=_chunks(vae, 1, 4))


def decoder(vae: nn.Module, mode: str = "exact") -> Network:
    """post_quant_conv, conv_in, mid block, up blocks, head, unpatchify, then the model's clamp to [-1, 1]."""
    check(vae)
    dec, post = vae.decoder, vae.post_quant_conv
    steps = [
        Step("post_quant_conv", lambda x, ctx: post(x), (post.in_channels, post.out_channels),
             conv_footprint(post), work=conv_work(post)),
        _causal_conv("decoder.conv_in", dec.conv_in),
    ]
    steps += _mid("decoder.mid_block", dec.mid_block, vae)
    for i, up in enumerate(dec.up_blocks):
        name = f"decoder.up_blocks.{i}"
        if isinstance(up, UP_LEVEL):
            steps += _up_level(name, up, len(steps), vae)
            continue
        if not isinstance(up, UP_BLOCK):
            raise unsupported(vae, f"{name} is a {type(up).__name__}")
        steps += [_block(f"{name}.resnets.{j}", r, vae) for j, r in enumerate(up.resnets)]
        if up.upsamplers is not None:
            steps.append(_block(f"{name}.upsampler", up.upsamplers[0], vae))
    steps.append(_causal_conv("decoder.conv_out", dec.conv_out, (dec.norm_out, dec.nonlinearity)))
    if patch_size(vae) > 1:
        steps.append(_unpatchify(vae))
    out = steps[-1].channels[1]
    steps.append(Step("clamp", lambda x, ctx: torch.clamp(x, min=-1.0, max=1.0), (out, out)))
    return Network(f"{type(vae).__name__} decoder", steps, latent_channels(vae), chunks=_chunks(vae, 1, 1))
