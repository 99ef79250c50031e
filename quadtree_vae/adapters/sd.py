"""Adapter for the 2-D VAEs of SD 1.x/2.x, SDXL, SD3 and Flux (diffusers ``AutoencoderKL``).

GroupNorm needs statistics of the whole feature map, so each resnet is described as two steps,
one per norm: ``conv1(act(norm1(x)))`` and ``conv2(act(norm2(h))) + shortcut(x)``. In exact mode
the planner cuts before every norm and the engine feeds it statistics merged from all tiles; in
fast mode the statistics come from a downscaled pass and nothing is cut. The mid-block attention
is a global step.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from torch import nn
from torch.nn import functional as F

from ..engine import Ctx, Network, Step
from ..geometry import POINTWISE, chain
from ..norm import group_norm
from .common import Facts, conv_footprint, conv_work, unsupported, upsample_footprint

MODELS = (AutoencoderKL, AutoencoderKLFlux2)
CLASSES = "AutoencoderKL (SD 1.x/2.x, SDXL, SD3, Flux), AutoencoderKLFlux2 (Flux.2)"


def supports(vae: nn.Module) -> bool:
    """AutoencoderKL, and Flux.2's class with the same encoder/decoder (its ``bn`` and 2x2 patchify of
    the latents are applied by the pipeline, outside ``encode``/``decode``, so they are not tiled here)."""
    return isinstance(vae, MODELS)


def check(vae: nn.Module) -> None:
    for name, m in vae.named_modules():
        kind = type(m).__name__
        if kind in ("SpatialNorm", "AdaGroupNorm", "FirDownsample2D", "FirUpsample2D", "KDownsample2D"):
            raise unsupported(vae, f"{name} is a {kind}, which the SD-family adapter does not describe")


def facts(vae: nn.Module) -> Facts:
    """Image VAEs: 2x per level of blocks, 4-D tensors only; Flux.2's pipelines fold 2x2 latents."""
    return Facts(type(vae).__name__, 2 ** (len(vae.config.block_out_channels) - 1), None,
                 in_channels(vae), latent_channels(vae), latent_patch=latent_patch(vae))


def latent_patch(vae: nn.Module) -> int:
    """Latent pixels per side Flux.2's pipelines fold into channels (``config.patch_size``); 1 for SD."""
    if not isinstance(vae, AutoencoderKLFlux2):
        return 1
    patch = vae.config.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def pack_latent(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The VAE's latent (B, C, h, w) as Flux.2's transformer takes it: 2x2 patches folded into
    channels (channel-major, as diffusers' ``Flux2Pipeline._patchify_latents`` and the original
    ``ae.encode`` fold them), then normalised by the model's ``bn`` running statistics. Identity for SD."""
    p = latent_patch(vae)
    if p == 1:
        return z
    b, c, h, w = z.shape
    packed = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)
    mean, std = _bn_moments(vae, packed)
    return (packed - mean) / std


def unpack_latent(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_latent`: a packed, normalised Flux.2 latent back to what ``decode`` takes."""
    p = latent_patch(vae)
    if p == 1:
        return z
    mean, std = _bn_moments(vae, z)
    b, c, h, w = z.shape
    z = z * std + mean
    return z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


def _bn_moments(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent batch norm's running mean and std (with its eps), shaped and typed like ``like``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def in_channels(vae: nn.Module) -> int:
    return vae.encoder.conv_in.in_channels


def latent_channels(vae: nn.Module) -> int:
    return vae.config.latent_channels


def _conv(name: str, conv: nn.Module) -> Step:
    return Step(name, lambda x, ctx: conv(x), (conv.in_channels, conv.out_channels), conv_footprint(conv),
                work=conv_work(conv))


def _activate(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, in place where the activation allows (``x`` is a fresh temporary): one allocation less."""
    return F.silu(x, inplace=True) if type(act) is nn.SiLU else act(x)


def _norm_act_conv(name: str, norm: nn.GroupNorm, act: nn.Module, conv: nn.Module) -> Step:
    """``conv(act(norm(x)))`` with the norm's statistics taken over the whole frame."""

    def fn(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return conv(_activate(act, group_norm(x, norm, ctx.stats)))

    return Step(name, fn, (conv.in_channels, conv.out_channels), conv_footprint(conv), norm=norm,
                work=conv_work(conv), temporaries=2.0)


def _resnet(name: str, r: nn.Module, index: int, vae: nn.Module) -> list[Step]:
    """The two halves of a ``ResnetBlock2D``; ``index`` is where the first half lands in the step list."""
    if r.upsample is not None or r.downsample is not None or r.time_emb_proj is not None:
        raise unsupported(vae, f"{name} resamples or takes a time embedding")
    if not isinstance(r.norm1, nn.GroupNorm) or not isinstance(r.norm2, nn.GroupNorm):
        raise unsupported(vae, f"{name} normalises with {type(r.norm1).__name__}")
    shortcut = r.conv_shortcut
    if shortcut is not None and conv_footprint(shortcut) != POINTWISE:
        raise unsupported(vae, f"{name}.conv_shortcut is not a 1x1 conv")
    first = _norm_act_conv(f"{name}.conv1", r.norm1, r.nonlinearity, r.conv1)

    def second(h: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return r.conv2(r.dropout(_activate(r.nonlinearity, group_norm(h, r.norm2, ctx.stats))))

    def join(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(shortcut(x) + h) / output_scale_factor``, accumulated in ``h`` (the step's own fresh output)."""
        h = h.add_(x if shortcut is None else shortcut(x))
        return h if r.output_scale_factor == 1 else h.div_(r.output_scale_factor)

    c_out = r.conv2.out_channels
    return [first, Step(f"{name}.conv2", second, (r.conv2.in_channels, c_out), conv_footprint(r.conv2),
                        norm=r.norm2, skip=index, join=join,
                        work=conv_work(r.conv2) + conv_work(shortcut or nn.Identity()), temporaries=3.0)]


def _resample(name: str, m: nn.Module, vae: nn.Module) -> Step:
    kind = type(m).__name__
    if kind == "Downsample2D" and m.use_conv and m.norm is None:
        extra = (0, 1, 0, 1) if m.padding == 0 else (0, 0, 0, 0)  # the module's own asymmetric pad
        return Step(name, lambda x, ctx: m(x), (m.channels, m.out_channels), conv_footprint(m.conv, extra),
                    work=conv_work(m))
    if kind == "Upsample2D" and m.use_conv and not m.use_conv_transpose and m.norm is None and m.interpolate:
        fp = chain(upsample_footprint(m), conv_footprint(m.conv))
        return Step(name, lambda x, ctx: m(x), (m.channels, m.out_channels), fp, work=conv_work(m),
                    temporaries=2.5)
    raise unsupported(vae, f"{name} is a {kind} this adapter does not describe")


def _attention(name: str, attn: nn.Module) -> Step:
    c = attn.query_dim if hasattr(attn, "query_dim") else attn.to_q.in_features
    return Step(name, lambda x, ctx: attn(x), (c, c), is_global=True, work=4.0 * c * c, temporaries=4.0)


def _blocks(prefix: str, blocks, steps: list[Step], vae: nn.Module, resamplers: str) -> None:
    for i, block in enumerate(blocks):
        if getattr(block, "attentions", None):
            raise unsupported(vae, f"{prefix}.{i} has attention layers outside the mid block")
        for j, r in enumerate(block.resnets):
            steps += _resnet(f"{prefix}.{i}.resnets.{j}", r, len(steps), vae)
        for j, m in enumerate(getattr(block, resamplers) or []):
            steps.append(_resample(f"{prefix}.{i}.{resamplers}.{j}", m, vae))


def _mid(prefix: str, mid: nn.Module, steps: list[Step], vae: nn.Module) -> None:
    steps += _resnet(f"{prefix}.resnets.0", mid.resnets[0], len(steps), vae)
    for i, (attn, r) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            steps.append(_attention(f"{prefix}.attentions.{i}", attn))
        steps += _resnet(f"{prefix}.resnets.{i + 1}", r, len(steps), vae)


def encoder(vae: nn.Module, mode: str = "exact", moments: bool = False) -> Network:
    """conv_in, down blocks, mid block, norm/act/conv_out, quant_conv; returns the posterior mean.

    With ``moments`` it returns what the model's ``_encode`` does: mean and log-variance.
    """
    check(vae)
    enc = vae.encoder
    z = 2 * latent_channels(vae) if moments else latent_channels(vae)
    steps = [_conv("encoder.conv_in", enc.conv_in)]
    _blocks("encoder.down_blocks", enc.down_blocks, steps, vae, "downsamplers")
    _mid("encoder.mid_block", enc.mid_block, steps, vae)
    steps.append(_norm_act_conv("encoder.conv_out", enc.conv_norm_out, enc.conv_act, enc.conv_out))
    quant = vae.quant_conv
    if quant is None:
        steps.append(Step("mean", lambda x, ctx: x[:, :z], (enc.conv_out.out_channels, z)))
    else:
        steps.append(Step("quant_conv", lambda x, ctx: quant(x)[:, :z], (quant.in_channels, z),
                          conv_footprint(quant), work=conv_work(quant)))
    return Network(f"{type(vae).__name__} encoder", steps, in_channels(vae))


def decoder(vae: nn.Module, mode: str = "exact") -> Network:
    """post_quant_conv, conv_in, mid block, up blocks, norm/act/conv_out."""
    check(vae)
    dec = vae.decoder
    steps = [] if vae.post_quant_conv is None else [_conv("post_quant_conv", vae.post_quant_conv)]
    steps.append(_conv("decoder.conv_in", dec.conv_in))
    _mid("decoder.mid_block", dec.mid_block, steps, vae)
    _blocks("decoder.up_blocks", dec.up_blocks, steps, vae, "upsamplers")
    steps.append(_norm_act_conv("decoder.conv_out", dec.conv_norm_out, dec.conv_act, dec.conv_out))
    return Network(f"{type(vae).__name__} decoder", steps, latent_channels(vae))
