"""Tests for quadtree_vae.hooks: enable/disable/tiled on diffusers VAEs and through real pipelines."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import max_diff, qwen_tiny, sd_tiny, video, wan_tiny
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

import quadtree_vae as qv
from quadtree_vae import InvalidInputError, UnsupportedArchitectureError
from quadtree_vae.hooks import STATE_ATTR, disable, enable, is_enabled, tiled

TOL = 1e-4
TILE = 32  # px: several tiles on the 64x96 / 64x80 test inputs


@pytest.fixture(scope="module")
def kl():
    return sd_tiny(seed=3)


@pytest.fixture(scope="module")
def wanv():
    return wan_tiny(seed=4)


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(2, 3, 64, 96, generator=g) * 2 - 1).clamp(-1, 1)


def snapshot(vae: nn.Module):
    """Identity of every attribute of every module, plus the weights."""
    attrs = {name: {k: id(v) for k, v in vars(m).items()} for name, m in vae.named_modules()}
    weights = {k: (v.clone(), v.data_ptr()) for k, v in vae.state_dict().items()}
    return attrs, weights


def assert_unchanged(vae: nn.Module, snap) -> None:
    attrs, weights = snap
    now = {name: {k: id(v) for k, v in vars(m).items()} for name, m in vae.named_modules()}
    assert now == attrs
    sd = vae.state_dict()
    assert sd.keys() == weights.keys()
    for k, (w, ptr) in weights.items():
        assert sd[k].data_ptr() == ptr and torch.equal(sd[k], w), k


def counter():
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))

    return calls, progress


# ------------------------------------------------------------------------------------ exactness


def test_autoencoderkl_matches_untiled(kl, image):
    with torch.no_grad():
        ref = kl.encode(image).latent_dist
        z = ref.mode()
        ref_y = kl.decode(z).sample
        ref_sample = ref.sample(generator=torch.Generator().manual_seed(7))
    calls, progress = counter()
    with tiled(kl, tile=TILE, progress=progress), torch.no_grad():
        out = kl.encode(image)
        dec = kl.decode(z)
    assert isinstance(out, AutoencoderKLOutput)
    post = out.latent_dist
    assert type(post) is DiagonalGaussianDistribution
    assert max_diff(post.parameters, ref.parameters) < TOL
    assert max_diff(post.mode(), z) < TOL
    assert max_diff(post.sample(generator=torch.Generator().manual_seed(7)), ref_sample) < TOL
    assert max_diff(post.kl(), ref.kl()) < 1e-2
    assert isinstance(dec, DecoderOutput)
    assert max_diff(dec.sample, ref_y) < TOL
    assert dec.sample.dtype == ref_y.dtype
    assert max(total for _, total in calls) > 1, "the test input must span several tiles"
    assert not is_enabled(kl)


def test_return_dict_false(kl, image):
    with torch.no_grad():
        z = kl.encode(image).latent_dist.mode()
        ref_y = kl.decode(z).sample
    with tiled(kl, tile=TILE), torch.no_grad():
        enc = kl.encode(image, return_dict=False)
        dec = kl.decode(z, return_dict=False)
    assert isinstance(enc, tuple) and len(enc) == 1 and isinstance(enc[0], DiagonalGaussianDistribution)
    assert max_diff(enc[0].mode(), z) < TOL
    assert isinstance(dec, tuple) and len(dec) == 1 and isinstance(dec[0], torch.Tensor)
    assert max_diff(dec[0], ref_y) < TOL


def test_slicing_runs_once_per_sample(kl, image):
    with torch.no_grad():
        ref = kl.encode(image).latent_dist.parameters
        ref_y = kl.decode(ref[:, :4]).sample
    kl.enable_slicing()
    try:
        calls, progress = counter()
        with tiled(kl, tile=TILE, progress=progress), torch.no_grad():
            params = kl.encode(image).latent_dist.parameters
            y = kl.decode(ref[:, :4]).sample
        starts = [c for c in calls if c[0] == 0]
        assert len(starts) == 4  # 2 samples, encode and decode, one engine run each
    finally:
        kl.disable_slicing()
    assert max_diff(params, ref) < TOL
    assert max_diff(y, ref_y) < TOL


def test_engine_takes_precedence_over_diffusers_tiling(kl):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_y = kl.decode(z).sample
    before = (kl.use_tiling, kl.tile_sample_min_size, kl.tile_latent_min_size)
    kl.enable_tiling()
    kl.tile_sample_min_size, kl.tile_latent_min_size = 32, 4  # make diffusers' own tiling kick in
    try:
        with torch.no_grad():
            theirs = kl.decode(z).sample
        with tiled(kl, tile=TILE), torch.no_grad():
            ours = kl.decode(z).sample
        assert kl.use_tiling  # left as it was
    finally:
        kl.use_tiling, kl.tile_sample_min_size, kl.tile_latent_min_size = before
    assert max_diff(theirs, ref_y) > 10 * TOL  # diffusers' blended tiles differ from the untiled model
    assert max_diff(ours, ref_y) < TOL


def test_wan_matches_untiled(wanv):
    x = video(1, 5, 48, 64, seed=2)
    with torch.no_grad():
        ref = wanv.encode(x).latent_dist
        ref_y = wanv.decode(ref.mode()).sample
    calls, progress = counter()
    with tiled(wanv, tile=TILE, progress=progress), torch.no_grad():
        post = wanv.encode(x).latent_dist
        y = wanv.decode(ref.mode(), return_dict=False)[0]
    assert max(total for _, total in calls) > 1
    assert max_diff(post.parameters, ref.parameters) < TOL
    assert max_diff(y, ref_y) < TOL
    assert y.abs().max() <= 1.0  # the Wan decoder's clamp


def test_wan_drops_extra_frames_like_diffusers(wanv):
    x = video(1, 7, 32, 32, seed=3)  # 7 frames: diffusers encodes the first 5
    with torch.no_grad():
        ref = wanv.encode(x).latent_dist.mode()
        with tiled(wanv, tile=24):
            ours = wanv.encode(x).latent_dist.mode()
        with tiled(wanv, tile=24, frames="error"), pytest.raises(InvalidInputError, match="not 1 \\+ 4k"):
            wanv.encode(x)
    assert ours.shape == ref.shape
    assert max_diff(ours, ref) < TOL


def test_qwen_image_decode_matches_untiled():
    vae = qwen_tiny(seed=5)
    z = torch.randn(1, 4, 1, 8, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z).sample
        with tiled(vae, tile=TILE):
            ours = vae.decode(z).sample
    assert max_diff(ours, ref) < TOL


def test_fast_mode_reaches_the_original_methods(kl, image):
    """Fast mode's statistics pass calls vae.encode/decode itself: it must not loop into the hooks."""
    image = image[:1]
    calls, progress = counter()
    with torch.no_grad():
        z = kl.encode(image).latent_dist.mode()
        ref_y = kl.decode(z).sample
        with tiled(kl, tile=TILE, mode="fast", progress=progress):
            y = kl.decode(z).sample
            ran_decode = len(calls)
            m = kl.encode(image).latent_dist.mode()
    assert ran_decode > 1 and len(calls) > ran_decode + 1  # both went through the engine, tile by tile
    assert calls[ran_decode - 1][0] == calls[ran_decode - 1][1] and calls[-1][0] == calls[-1][1]
    assert y.shape == ref_y.shape and m.shape == z.shape
    # and gave what the engine gives in fast mode (the statistics pass reached the original methods)
    assert max_diff(y, qv.decode(kl, z, tile=TILE, mode="fast")) < TOL
    assert max_diff(m, qv.encode(kl, image, tile=TILE, mode="fast")) < TOL


def test_input_requiring_grad_runs_untiled_with_a_warning(kl):
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ref = kl.decode(z).sample
    calls, progress = counter()
    with tiled(kl, tile=16, progress=progress), pytest.warns(UserWarning, match="requires grad"):
        y = kl.decode(z).sample
    assert not calls and y.grad_fn is not None
    y.sum().backward()
    kl.zero_grad(set_to_none=True)
    assert z.grad is not None and max_diff(y, ref) == 0


# ------------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def sd_pipes():
    from diffusers import (
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
        ).eval()
    vae = sd_tiny(seed=6, scaling_factor=1.0)  # unit scale keeps the decoded images out of the clamp
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    parts = dict(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    txt2img = StableDiffusionPipeline(**parts)
    img2img = StableDiffusionImg2ImgPipeline(**parts)
    for p in (txt2img, img2img):
        p.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1))
    return txt2img, img2img, embeds


def test_txt2img_pipeline(sd_pipes):
    pipe, _, embeds = sd_pipes

    def run():
        return pipe(prompt_embeds=embeds, height=64, width=96, num_inference_steps=2, guidance_scale=1.0,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    ref = run()
    snap = snapshot(pipe.vae)
    calls, progress = counter()
    with tiled(pipe.vae, tile=TILE, progress=progress):
        ours = run()
    assert_unchanged(pipe.vae, snap)
    assert max(total for _, total in calls) > 1
    assert ref.std().item() > 0.05  # not a flat (clamped) image
    assert max_diff(ours, ref) < TOL


def test_img2img_pipeline_samples_the_posterior(sd_pipes):
    """img2img encodes the image and draws latent_dist.sample(generator): it must match the untiled draw."""
    _, pipe, embeds = sd_pipes
    img = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))

    def run():
        return pipe(prompt_embeds=embeds, image=img, strength=0.6, num_inference_steps=3, guidance_scale=1.0,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    ref = run()
    enable(pipe.vae, tile=TILE)
    try:
        ours = run()
    finally:
        assert disable(pipe.vae)
    assert max_diff(ours, ref) < TOL


# ---------------------------------------------------------------------------- state and refusals


@pytest.mark.parametrize("which", ["kl", "wanv"])
def test_state_restored_after_disable(which, request):
    vae = request.getfixturevalue(which)
    x = torch.randn(1, 3, 32, 32) if which == "kl" else video(1, 1, 32, 32)
    snap = snapshot(vae)
    enable(vae, tile=24)
    assert is_enabled(vae) and "_encode" in vars(vae) and "_decode" in vars(vae)
    with torch.no_grad():
        vae.decode(vae.encode(x).latent_dist.mode())
    assert disable(vae)
    assert not is_enabled(vae)
    assert STATE_ATTR not in vars(vae) and "_encode" not in vars(vae) and "_decode" not in vars(vae)
    assert_unchanged(vae, snap)
    assert not disable(vae)  # nothing left to undo


def test_state_restored_after_exception(kl, image):
    snap = snapshot(kl)
    with pytest.raises(RuntimeError, match="boom"), tiled(kl, tile=TILE), torch.no_grad():
        kl.decode(kl.encode(image).latent_dist.mode())
        raise RuntimeError("boom")
    assert_unchanged(kl, snap)
    # an error raised inside the engine: the hooks stay usable, and leave no trace on exit
    with tiled(kl, tile=TILE), torch.no_grad():
        with pytest.raises(InvalidInputError, match="channels"):
            kl.decode(torch.randn(1, 3, 8, 8))  # wrong latent channels
        y = kl.decode(torch.randn(1, 4, 4, 4)).sample
        assert y.shape == (1, 3, 32, 32)
    assert_unchanged(kl, snap)


def test_existing_instance_attribute_is_put_back(kl):
    def custom_decode(z, return_dict=True):
        return type(kl)._decode(kl, z, return_dict)

    kl._decode = custom_decode
    try:
        enable(kl, tile=TILE)
        assert vars(kl)["_decode"] is not custom_decode
        disable(kl)
        assert vars(kl)["_decode"] is custom_decode
    finally:
        del kl._decode


def test_double_enable_refused(kl):
    with tiled(kl, tile=TILE):
        with pytest.raises(InvalidInputError, match="already enabled"):
            enable(kl)
        with pytest.raises(InvalidInputError, match="already enabled"), tiled(kl):
            pass
        assert is_enabled(kl)  # the refused second enable left the first one alone
    assert not is_enabled(kl)


class NotAVae(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 3)

    def _encode(self, x):
        return self.encoder(x)

    def _decode(self, z, return_dict=True):
        return z


def test_unsupported_class_refused():
    model = NotAVae()
    snap = snapshot(model)
    with pytest.raises(UnsupportedArchitectureError, match="NotAVae"):
        enable(model)
    with pytest.raises(UnsupportedArchitectureError):
        enable(object())
    with pytest.warns(UserWarning, match="untouched"):
        assert enable(model, fallback="full") is model
    assert not is_enabled(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tiled(model, fallback="full"):
            assert not is_enabled(model)
    assert_unchanged(model, snap)


def test_invalid_options_refused_before_hooking(kl):
    for bad in (dict(mode="turbo"), dict(tile=4), dict(budget="lots"), dict(frames="x"), dict(fallback="x"),
                dict(progress=3)):
        with pytest.raises(InvalidInputError):
            enable(kl, **bad)
        assert not is_enabled(kl) and "_encode" not in vars(kl)


def test_copies_of_an_enabled_model(kl):
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = kl.decode(z).sample
    with tiled(kl, tile=16):
        clone = copy.deepcopy(kl)
        pickled = pickle.loads(pickle.dumps(kl))
    assert is_enabled(clone) and vars(clone)["_decode"].vae is clone
    calls, progress = counter()
    state = vars(clone)[STATE_ATTR]
    state.options = dataclasses.replace(state.options, progress=progress)
    with torch.no_grad():
        assert max_diff(clone.decode(z).sample, ref) < TOL
    assert calls  # the copy runs tiled, on its own weights
    assert disable(clone) and "_decode" not in vars(clone)
    assert is_enabled(pickled) and vars(pickled)["_decode"].vae is pickled
    with torch.no_grad():
        assert max_diff(pickled.decode(z).sample, ref) < TOL
    disable(pickled)
    assert "_decode" not in vars(pickled)


def test_unexpected_arguments_run_untiled_with_a_warning(kl):
    """Arguments the engine does not take go to the model's own method, with a warning (which
    here refuses them, as it would without quadtree-vae)."""
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(6))
    calls, progress = counter()
    with torch.no_grad(), tiled(kl, tile=16, progress=progress):
        with pytest.warns(UserWarning, match="arguments the tiled engine does not take \\(generator=...\\)"), \
                pytest.raises(TypeError, match="generator"):
            vars(kl)["_decode"](z, True, generator=None)
        with pytest.warns(UserWarning, match="does not take \\(str\\)"), pytest.raises(TypeError):
            vars(kl)["_encode"](torch.zeros(1, 3, 32, 32), "extra")
        assert calls == []  # the engine did not run
        kl.decode(z)
        assert calls  # and does on an ordinary call


# ------------------------------------------------------------------- Wan 2.2, Qwen-Image 2.1, Flux.2


def _hooked_equals_unhooked(vae, x, tile):
    """encode and decode through qv.tiled == the unhooked model, and the engine ran tile by tile."""
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
        ref_y = vae.decode(ref.mode()).sample
    calls, progress = counter()
    with tiled(vae, tile=tile, progress=progress), torch.no_grad():
        post = vae.encode(x).latent_dist
        encode_runs = len(calls)
        y = vae.decode(ref.mode()).sample
    assert encode_runs > 2 and len(calls) > encode_runs + 2, "both calls must go through the engine, tile by tile"
    assert max(total for _, total in calls) > 1
    assert not is_enabled(vae)
    assert max_diff(post.parameters, ref.parameters) < TOL
    assert max_diff(y, ref_y) < TOL


def test_wan22_matches_untiled():
    from test_wan22 import wan22_tiny

    _hooked_equals_unhooked(wan22_tiny(seed=6), video(1, 5, 48, 80, seed=4), tile=48)


def test_qwen_image21_matches_untiled():
    from test_wan22 import qwen21_tiny, rgba

    _hooked_equals_unhooked(qwen21_tiny(seed=7), rgba(1, 48, 80, seed=5), tile=32)


def test_flux2_matches_untiled(image):
    from conftest import flux2_tiny

    _hooked_equals_unhooked(flux2_tiny(seed=8), image[:1], tile=TILE)
