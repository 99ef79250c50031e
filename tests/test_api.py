"""Refusals before heavy work, options, and the plan object."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import max_diff, untiled_encode, video

import quadtree_vae as qv
from quadtree_vae.geometry import Region, grid
from quadtree_vae.options import parse_bytes
from quadtree_vae.planner import MIN_TILE


def refuses(match: str, fn, *args, **kwargs):
    with pytest.raises(qv.InvalidInputError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((3, 32, 32), "expected an image/video tensor"),
        ((1, 1, 3, 1, 32, 32), "expected an image/video tensor"),
        ((1, 4, 1, 32, 32), "expected 3 channels, got 4"),
        ((1, 3, 1, 36, 32), "multiples of 8, got 36x32"),
        ((0, 3, 1, 32, 32), "empty"),
        ((1, 3, 0, 32, 32), "empty"),
    ],
)
def test_bad_encode_shapes(wan, shape, match):
    refuses(match, qv.encode, wan, torch.zeros(shape))


def test_bad_decode_shapes(wan, sd):
    refuses("expected 4 channels, got 16", qv.decode, wan, torch.zeros(1, 16, 1, 4, 4))
    refuses("expected a latent tensor", qv.decode, sd, torch.zeros(1, 4, 1, 4, 4))
    refuses("empty", qv.decode, sd, torch.zeros(1, 4, 0, 4))


def test_frames_that_are_not_one_plus_four_k_are_never_dropped_silently(wan):
    x = video(1, 7, 32, 32)
    refuses("7 frames is not 1 \\+ 4k; the model would silently drop the last 2", qv.encode, wan, x)
    trimmed = qv.encode(wan, x, tile=24, frames="trim")
    assert max_diff(trimmed, untiled_encode(wan, x[:, :, :5])) <= 1e-4
    padded = qv.encode(wan, x, tile=24, frames="pad")
    x9 = torch.cat([x, x[:, :, -1:], x[:, :, -1:]], dim=2)
    assert padded.shape[2] == 3
    assert max_diff(padded, untiled_encode(wan, x9)) <= 1e-4
    refuses("frames must be one of", qv.encode, wan, x, frames="drop")


def test_non_finite_and_non_float_input(wan):
    x = video(1, 1, 32, 32)
    x[0, 0, 0, 3, 3] = float("nan")
    refuses("NaN or Inf", qv.encode, wan, x)
    refuses("NaN or Inf", qv.decode, wan, torch.full((1, 4, 1, 2, 2), float("inf")))
    refuses("floating-point", qv.encode, wan, torch.zeros(1, 3, 1, 32, 32, dtype=torch.int64))
    refuses("torch.Tensor", qv.encode, wan, [[1.0]])


def test_tile_and_budget_checks(wan):
    x = video(1, 1, 32, 32)
    refuses(f"below the minimum tile side of {MIN_TILE} px", qv.encode, wan, x, tile=8)
    # the model's halo sets a larger minimum: a block must see its core plus the halo on both sides
    refuses("below the minimum of 24 px for AutoencoderKLWan decoder: its blocks read 5 px", qv.decode, wan,
            torch.zeros(1, 4, 1, 4, 4), tile=16)
    refuses("tile must be an int", qv.encode, wan, x, tile="big")
    refuses("cannot read memory size", qv.encode, wan, x, budget="lots")
    refuses("must be positive", qv.encode, wan, x, budget=0)
    refuses("budget too small", qv.encode, wan, x, budget=1000)
    refuses("mode must be one of", qv.encode, wan, x, mode="approx")
    assert parse_bytes("4GB") == 4 * 2**30
    assert parse_bytes("1.5 mb") == int(1.5 * 2**20)
    assert parse_bytes(123) == 123


def test_unsupported_models_are_named_and_can_fall_back():
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval()
    with pytest.raises(qv.UnsupportedArchitectureError, match="AutoencoderTiny is not a supported VAE class"):
        qv.decode(tiny, torch.zeros(1, 4, 4, 4))
    with pytest.raises(qv.UnsupportedArchitectureError, match="Linear is not a torch module|not a supported"):
        qv.plan(torch.nn.Linear(2, 2), (1, 3, 8, 8))
    z = torch.randn(1, 4, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = qv.decode(tiny, z, fallback="full")
    assert any("untiled" in str(w.message) for w in caught)
    with torch.no_grad():
        assert torch.equal(out, tiny.decode(z).sample)


def test_plan_infers_the_operation_and_describes_itself(wan, sd):
    p = qv.plan(wan, (1, 3, 5, 64, 96), tile=32)
    assert p.op == "encode" and p.out_shape == (1, 4, 2, 8, 12)
    assert qv.plan(wan, (1, 4, 2, 8, 12)).op == "decode"
    text = p.describe()
    assert "encoder.mid_block.attentions.0" in text and "work" in text
    assert p.overhead >= 1.0 and p.tiles >= len(p.segments)
    assert qv.plan(sd, (1, 4, 8, 8), op="decode").out_shape == (1, 3, 64, 64)


def test_explicit_layouts_are_checked(wan):
    p = qv.plan(wan, (1, 4, 1, 4, 6))
    last = len(p.segments) - 1
    with pytest.raises(qv.InvalidInputError, match="covered 2 times|cover"):
        p.with_layouts({last: grid(32, 48, [16]) + (Region((0, 8), (0, 8)),)})
    attn = next(i for i, s in enumerate(p.segments) if s.is_global)
    with pytest.raises(qv.InvalidInputError, match="whole frame"):
        p.with_layouts({attn: grid(4, 6, [2])})
    z = torch.randn(1, 4, 1, 4, 6)
    refuses("the plan was made for decode of", qv.decode, wan, torch.randn(1, 4, 1, 8, 6), plan=p)
    assert qv.decode(wan, z, plan=p.with_layouts({last: grid(32, 48, [5, 17], [1, 30])})).shape == (1, 3, 1, 32, 48)


def test_a_plan_does_not_keep_the_model_alive_and_pickles():
    import gc
    import pickle
    import weakref

    from conftest import sd_tiny

    vae = sd_tiny()
    p = qv.plan(vae, (1, 4, 4, 6))
    alive = weakref.ref(vae)
    copy = pickle.loads(pickle.dumps(p))
    last = len(p.segments) - 1
    layout = {last: grid(32, 48, [16])}
    assert copy.with_layouts(layout) == p.with_layouts(layout)
    assert copy.with_layouts(layout).segments[last].peak < p.segments[last].peak  # re-estimated, model-free
    del vae
    gc.collect()
    assert alive() is None
    z = torch.randn(1, 4, 4, 6)
    vae = sd_tiny()
    assert max_diff(qv.decode(vae, z, plan=copy.with_layouts(layout)), qv.decode(vae, z, tile=32)) <= 1e-4


def test_a_segment_never_writes_over_its_own_input():
    from types import SimpleNamespace

    from quadtree_vae.engine import Frames, Step, _reusable

    def ident(x, ctx):
        return x

    steps = [Step("a", ident, (1, 1)), Step("b", ident, (1, 1), skip=0, join=torch.add)]
    seg = SimpleNamespace(start=0, stop=2)
    source = Frames(torch.zeros(1, 1, 4, 4), None)
    other = Frames(torch.zeros(1, 1, 4, 4), None)
    cpu = torch.device("cpu")
    assert _reusable(steps, seg, {0: other}, cpu, source) is other
    assert _reusable(steps, seg, {0: source}, cpu, source) is None
    view = Frames(source.tensor[:, :, 1:], None)  # shares the input's memory
    assert _reusable(steps, seg, {0: view}, cpu, source) is None
