"""Adapter for the 3-D causal VAEs of Wan 2.1 and Qwen-Image (``AutoencoderKLWan``, ``AutoencoderKLQwenImage``).

Only describes the network: the model's own blocks, run with a causal cache that belongs to the
tile, and the footprints read off their convs. Norms are RMS over channels (pointwise), so the
only global op is the single-head attention of the mid blocks. The model streams time itself:
the encoder takes one frame, then chunks of four; the decoder one latent frame at a time.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen
from diffusers.models.autoencoders import autoencoder_kl_wan as wan
from torch import nn

from ..engine import Ctx, Network, Step
from ..geometry import POINTWISE, chain
from .common import Facts, conv_footprint, conv_work, unsupported, upsample_footprint

MODELS = (wan.AutoencoderKLWan, qwen.AutoencoderKLQwenImage)
CAUSAL_CONV = (wan.WanCausalConv3d, qwen.QwenImageCausalConv3d)
RESIDUAL = (wan.WanResidualBlock, qwen.QwenImageResidualBlock)
ATTENTION = (wan.WanAttentionBlock, qwen.QwenImageAttentionBlock)
RESAMPLE = (wan.WanResample, qwen.QwenImageResample)
CACHE_T = wan.CACHE_T
CLASSES = "AutoencoderKLWan (Wan 2.1), AutoencoderKLQwenImage (Qwen-Image)"


def supports(vae: nn.Module) -> bool:
    return isinstance(vae, MODELS)


def check(vae: nn.Module) -> None:
    """Refuse configurations whose blocks this adapter does not describe (Wan 2.2)."""
    cfg = vae.config
    if cfg.get("is_residual") or cfg.get("patch_size"):
        raise unsupported(
            vae,
            "Wan 2.2 configurations (is_residual=True / patch_size) are not supported yet: their residual "
            "up/down blocks and patchify are missing from the Wan adapter (Wan 2.1 and Qwen-Image are supported)",
        )


def facts(vae: nn.Module) -> Facts:
    """Video VAEs: 2x per spatial level, 2x per temporally downsampling level; 1 + 4k frames for Wan 2.1."""
    cfg = vae.config
    return Facts(type(vae).__name__, 2 ** (len(cfg.dim_mult) - 1), 2 ** sum(cfg.temperal_downsample),
                 in_channels(vae), latent_channels(vae))


def in_channels(vae: nn.Module) -> int:
    return vae.encoder.conv_in.in_channels


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


def _block(name: str, block: nn.Module, vae: nn.Module) -> Step:
    """One entry of the model's block lists, run by its own ``forward`` with the tile's cache."""

    def cached(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return block(x, feat_cache=ctx.cache, feat_idx=[0])

    if isinstance(block, RESIDUAL):
        if not isinstance(block.conv_shortcut, nn.Identity) and conv_footprint(block.conv_shortcut) != POINTWISE:
            raise unsupported(vae, f"{name}.conv_shortcut is not a 1x1 conv")
        fp = chain(conv_footprint(block.conv1), conv_footprint(block.conv2))
        return Step(name, cached, (block.in_dim, block.out_dim), fp, cache_slots=2, work=conv_work(block),
                    temporaries=3.0)
    if isinstance(block, ATTENTION):
        return Step(name, lambda x, ctx: block(x), (block.dim, block.dim), is_global=True,
                    work=conv_work(block), temporaries=4.0)
    if isinstance(block, RESAMPLE):
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
        return Step(name, cached, (block.dim, convs[0].out_channels), fp, cache_slots=int(mode.endswith("3d")),
                    time_scale=scale, work=conv_work(block), temporaries=2.5)
    raise unsupported(vae, f"{name} is a {type(block).__name__}, which the Wan/Qwen-Image adapter does not know")


def _mid(name: str, mid: nn.Module, vae: nn.Module) -> list[Step]:
    steps = [_block(f"{name}.resnets.0", mid.resnets[0], vae)]
    for i, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            steps.append(_block(f"{name}.attentions.{i}", attn, vae))
        steps.append(_block(f"{name}.resnets.{i + 1}", resnet, vae))
    return steps


def encoder(vae: nn.Module, mode: str = "exact", moments: bool = False) -> Network:
    """conv_in, down blocks, mid block, head, quant_conv; returns the posterior mean (``mode()``).

    With ``moments`` it returns what the model's ``_encode`` does: mean and log-variance.
    """
    check(vae)
    enc = vae.encoder
    z = 2 * latent_channels(vae) if moments else latent_channels(vae)
    steps = [_causal_conv("encoder.conv_in", enc.conv_in)]
    steps += [_block(f"encoder.down_blocks.{i}", b, vae) for i, b in enumerate(enc.down_blocks)]
    steps += _mid("encoder.mid_block", enc.mid_block, vae)
    steps.append(_causal_conv("encoder.conv_out", enc.conv_out, (enc.norm_out, enc.nonlinearity)))
    quant = vae.quant_conv
    steps.append(Step("quant_conv", lambda x, ctx: quant(x)[:, :z], (quant.in_channels, z),
                      conv_footprint(quant), work=conv_work(quant)))
    return Network(f"{type(vae).__name__} encoder", steps, in_channels(vae),
                   chunks=lambda t: [1] + [4] * ((t - 1) // 4))


def decoder(vae: nn.Module, mode: str = "exact") -> Network:
    """post_quant_conv, conv_in, mid block, up blocks, head, then the model's clamp to [-1, 1]."""
    check(vae)
    dec, post = vae.decoder, vae.post_quant_conv
    steps = [
        Step("post_quant_conv", lambda x, ctx: post(x), (post.in_channels, post.out_channels),
             conv_footprint(post), work=conv_work(post)),
        _causal_conv("decoder.conv_in", dec.conv_in),
    ]
    steps += _mid("decoder.mid_block", dec.mid_block, vae)
    for i, up in enumerate(dec.up_blocks):
        if type(up).__name__ not in ("WanUpBlock", "QwenImageUpBlock"):
            raise unsupported(vae, f"decoder.up_blocks.{i} is a {type(up).__name__}")
        steps += [_block(f"decoder.up_blocks.{i}.resnets.{j}", r, vae) for j, r in enumerate(up.resnets)]
        if up.upsamplers is not None:
            steps.append(_block(f"decoder.up_blocks.{i}.upsampler", up.upsamplers[0], vae))
    steps.append(_causal_conv("decoder.conv_out", dec.conv_out, (dec.norm_out, dec.nonlinearity)))
    out = dec.conv_out.out_channels
    steps.append(Step("clamp", lambda x, ctx: torch.clamp(x, min=-1.0, max=1.0), (out, out)))
    return Network(f"{type(vae).__name__} decoder", steps, latent_channels(vae), chunks=lambda t: [1] * t)
