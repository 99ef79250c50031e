"""Geometry and statistics as pure functions: footprints against real torch ops, layouts, moments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from quadtree_vae.geometry import (
    POINTWISE,
    Conv,
    Region,
    Up,
    chain,
    check_layout,
    even_cuts,
    full,
    grid,
    halo_regions,
    produced,
    quadtree,
    sizes_along,
)
from quadtree_vae.norm import Moments, group_norm, merge_all

# Each op: (footprint, function on a 4-D tensor). The functions pad the way the VAEs' modules do.
W3 = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0)) / 4
OPS = {
    "conv3": (Conv(3, 1, (1, 1)), lambda x: F.conv2d(x, W3, padding=1)),
    "down": (Conv(3, 2, (0, 1)), lambda x: F.conv2d(F.pad(x, (0, 1, 0, 1)), W3, stride=2)),
    "up": (chain(Up(2), Conv(3, 1, (1, 1))), lambda x: F.conv2d(F.interpolate(x, scale_factor=2.0), W3, padding=1)),
    "point": (POINTWISE, lambda x: torch.tanh(x) * 2),
    "conv5": (Conv(5, 1, (2, 2)), lambda x: F.conv2d(x, torch.ones(2, 2, 5, 5) / 50, padding=2)),
}


def tiled(ops, x, layout):
    """Run ``ops`` on each tile's halo region, cropping after each op, and assemble the cores."""
    fps = [OPS[o][0] for o in ops]
    size = tuple(x.shape[-2:])
    out = None
    for core in layout:
        regions = halo_regions(fps, core, size)
        t = x[..., regions[0].y[0] : regions[0].y[1], regions[0].x[0] : regions[0].x[1]]
        for k, o in enumerate(ops):
            got = produced(fps[k], regions[k])
            t = OPS[o][1](t)
            assert tuple(t.shape[-2:]) == (got.h, got.w)
            ys, xs = regions[k + 1].within(got)
            t = t[..., ys, xs]
        if out is None:
            h, w = sizes_along(fps, size)[-1]
            out = torch.full((*t.shape[:-2], h, w), float("nan"))
        out[..., core.y[0] : core.y[1], core.x[0] : core.x[1]] = t
    return out


@st.composite
def chains_and_layouts(draw):
    ops = draw(st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=6))
    h = draw(st.integers(8, 40))
    w = draw(st.integers(8, 40))
    fps = [OPS[o][0] for o in ops]
    sizes = sizes_along(fps, (h, w))
    assume(min(min(s) for s in sizes) >= 2)
    oh, ow = sizes[-1]
    ys = draw(st.lists(st.integers(1, max(1, oh - 1)), max_size=4)) if oh > 1 else []
    xs = draw(st.lists(st.integers(1, max(1, ow - 1)), max_size=4)) if ow > 1 else []
    return ops, (h, w), grid(oh, ow, ys, xs)


@settings(max_examples=80, deadline=None)
@given(chains_and_layouts())
def test_cropping_block_by_block_reproduces_the_whole_frame(case):
    ops, (h, w), layout = case
    x = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    ref = x
    for o in ops:
        ref = OPS[o][1](ref)
    out = tiled(ops, x, layout)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item())), (out - ref).abs().max()


def test_halo_shrinks_with_depth_and_is_clipped_at_the_border():
    fps = [Conv(3, 1, (1, 1))] * 4
    regions = halo_regions(fps, Region((10, 20), (0, 8)), (40, 40))
    assert [r.y for r in regions] == [(6, 24), (7, 23), (8, 22), (9, 21), (10, 20)]
    assert [r.x for r in regions] == [(0, 12), (0, 11), (0, 10), (0, 9), (0, 8)]


def test_downsampler_needs_even_starts_and_one_extra_pixel():
    down = Conv(3, 2, (0, 1))
    assert down.need((3, 5), 100) == (6, 11)
    assert down.produced((6, 11)) == (3, 5)
    assert down.out_size(64) == 32
    with pytest.raises(ValueError):
        down.produced((5, 11))


def test_upsampler_footprint():
    up = chain(Up(2), Conv(3, 1, (1, 1)))
    assert up.need((5, 9), 100) == (2, 5)
    assert up.produced((2, 5)) == (4, 10)
    assert up.out_size(7) == 14


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.integers(1, 5000), st.sampled_from([1, 2, 4, 8]))
def test_quadtree_covers_the_frame_once_and_respects_fit(h, w, limit, align):
    layout = quadtree(h, w, lambda r: r.area <= limit, align=align)
    check_layout(layout, h, w)
    for r in layout:
        assert r.area <= limit or r.h < 2 * align or r.w < 2 * align


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 100), st.integers(1, 100))
def test_quadtree_with_a_cap_gives_balanced_tiles_no_larger_than_the_cap(h, w, ch, cw):
    layout = quadtree(h, w, lambda r: True, align=1, cap=(ch, cw))
    check_layout(layout, h, w)
    assert all(r.h <= ch and r.w <= cw for r in layout)
    assert len(layout) == -(-h // ch) * -(-w // cw)


def test_even_cuts():
    assert even_cuts(512, 256, 8) == [256]
    assert even_cuts(520, 256, 8) == [176, 344]
    assert even_cuts(100, 200) == []


def test_check_layout_rejects_gaps_and_overlaps():
    check_layout(grid(10, 10, [3], [4, 7]), 10, 10)
    with pytest.raises(ValueError):
        check_layout((Region((0, 5), (0, 10)),), 10, 10)
    with pytest.raises(ValueError):
        check_layout((full(10, 10), Region((0, 5), (0, 5))), 10, 10)
    with pytest.raises(ValueError):
        check_layout((Region((0, 5), (0, 10)), Region((4, 10), (0, 10)), Region((0, 1), (0, 1))), 10, 10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 15), min_size=0, max_size=3), st.lists(st.integers(1, 23), min_size=0, max_size=3),
       st.integers(1, 3))
def test_moments_merged_from_unequal_tiles_equal_whole_frame_groupnorm(ys, xs, b):
    g = torch.Generator().manual_seed(len(ys) * 7 + len(xs))
    x = torch.randn(b, 8, 16, 24, generator=g) * 3 + 5
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    layout = grid(16, 24, ys, xs)
    stats = merge_all([Moments.of(x[..., r.y[0] : r.y[1], r.x[0] : r.x[1]], 4) for r in layout])
    whole = x.double().reshape(b, 4, -1)
    # per-tile moments are float32-accurate (as GroupNorm's own); merging them loses nothing more
    assert torch.allclose(stats.mean, whole.mean(-1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(stats.var, whole.var(-1, unbiased=False), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = norm(x)
        for r in layout:
            tile = x[..., r.y[0] : r.y[1], r.x[0] : r.x[1]]
            out = group_norm(tile, norm, stats)
            assert torch.allclose(out, ref[..., r.y[0] : r.y[1], r.x[0] : r.x[1]], atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 5.0, 1e3])
def test_tile_moments_stay_accurate_when_the_mean_dwarfs_the_spread(offset):
    """Row sums give E[x^2] - mean^2, which cancels when mean >> std: such tiles take var_mean."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 8, 40, 30, generator=g) * 0.1 + offset)[..., 3:37, 2:29]  # a cropped tile
    m = Moments.of(x, 4)
    whole = x.double().reshape(2, 4, -1)
    assert m.n == whole.shape[-1]
    assert torch.allclose(m.mean, whole.mean(-1), rtol=1e-6, atol=1e-7)
    assert torch.allclose(m.var, whole.var(-1, unbiased=False), rtol=1e-5, atol=0)
