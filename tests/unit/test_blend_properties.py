"""Properties of plan + blend for any valid tiling (hypothesis): full coverage, weights that
normalise to one, identity round trip, and a result independent of the order tiles finish in."""
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel_vae import plan as P
from parallel_vae.blend import Blender, allocate_output, feather_mask
from parallel_vae.plan import CAUSAL


@st.composite
def plans(draw):
    kind = draw(st.sampled_from(["image", "video", "causal"]))
    batch = draw(st.integers(1, 2))
    tile = draw(st.integers(2, 9))
    overlap = draw(st.integers(0, tile // 2 - 1 if tile >= 4 else 0))
    factor = draw(st.sampled_from([1, 2, 4]))
    h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    if kind == "image":
        if tile < 4:
            tile, overlap = 4, min(overlap, 1)
        return P.plan_image((batch, 1, h, w), P.TileSettings(tile, overlap), P.AxisScale(factor), 2)
    k = draw(st.sampled_from([1, 2, 4]))
    t = draw(st.integers(1, 7))
    scales = (P.AxisScale(k, k - 1), P.AxisScale(factor), P.AxisScale(factor))
    tile_t = draw(st.integers(2, 5))
    settings_ = P.TileSettings(tile, overlap, tile_t, draw(st.integers(1, tile_t - 1)))
    make = P.plan_causal if kind == "causal" else P.plan_video
    return make((batch, 1, t, h, w), settings_, scales, 2)


def truth(plan, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(plan.out_shape, generator=g)


def tile_pixels(plan, tile, step, video):
    """What a perfect decoder returns for a tile: the true pixels of its output box."""
    box = video.narrow(0, tile.batch, 1)
    starts, sizes = list(tile.out_start), list(tile.out_size)
    if plan.kind == CAUSAL:
        f0, f1 = plan.step_frames[step]
        starts[0], sizes[0] = f0, f1 - f0
    for d, (p, n) in enumerate(zip(starts, sizes)):
        box = box.narrow(d + 2, p, n)
    return box.clone()


def units(plan):
    return [(t, s) for t in plan.tiles for s in range(plan.steps)]


def blend_all(plan, video, order):
    _, out = allocate_output(plan)
    b = Blender(plan, out)
    for tile, step in order:
        b.add(tile.index, step, tile_pixels(plan, tile, step, video))
    assert b.complete
    return out


@settings(max_examples=150, deadline=None)
@given(plans())
def test_tiles_cover_every_output_pixel_and_stay_inside(plan):
    axes = plan.out_shape[2:]
    for batch in range(plan.batch):
        for p in range(plan.passes):
            cover = torch.zeros(axes)
            for t in plan.tiles_of(batch):
                if t.pass_index != p:
                    continue
                assert all(0 <= s and s + n <= a for s, n, a in zip(t.out_start, t.out_size, axes))
                assert all(0 <= s and s + n <= a for s, n, a in zip(t.in_start, t.in_size, plan.in_shape[2:]))
                region = cover
                for d, (s, n) in enumerate(zip(t.out_start, t.out_size)):
                    region = region.narrow(d, s, n)
                region += 1
            assert cover.min() >= 1, f"pass {p} leaves pixels uncovered"


@settings(max_examples=150, deadline=None)
@given(plans(), st.floats(-3.0, 3.0))
def test_tiles_of_one_value_blend_to_that_value_everywhere(plan, value):
    """The blender's weights normalise to one at every pixel: every tile the same value gives that
    value, whatever the feathers and overlaps, and no tile pixel is weighted zero."""
    for t in plan.tiles:
        assert feather_mask(t.out_size, t.feather).min() > 0, "a tile pixel would get zero weight"
    constant = torch.full(plan.out_shape, value)
    out = blend_all(plan, constant, [(t, s) for b in range(plan.batch) for s in range(plan.steps)
                                     for t in plan.tiles_of(b)] if plan.kind == CAUSAL else units(plan))
    assert torch.allclose(out, constant, atol=1e-5, rtol=0)


@settings(max_examples=150, deadline=None)
@given(plans(), st.integers(0, 2**31 - 1))
def test_identity_round_trip_through_tile_and_blend(plan, seed):
    video = truth(plan, seed)
    out = blend_all(plan, video, units(plan) if plan.kind != CAUSAL else
                    [(t, s) for b in range(plan.batch) for s in range(plan.steps) for t in plan.tiles_of(b)])
    assert torch.allclose(out, video, atol=2e-6, rtol=0)


@settings(max_examples=100, deadline=None)
@given(plans(), st.integers(0, 2**31 - 1))
def test_result_is_bit_identical_whatever_order_tiles_finish_in(plan, seed):
    # Different values per tile and pass, so the order of additions would show if it leaked.
    g = torch.Generator().manual_seed(seed)
    noise = {(t.index, s): torch.rand((1, plan.out_shape[1]) + tuple(
        (plan.step_frames[s][1] - plan.step_frames[s][0]) if (plan.kind == CAUSAL and d == 0) else n
        for d, n in enumerate(t.out_size)), generator=g) for t, s in units(plan)}

    def run(order):
        _, out = allocate_output(plan)
        b = Blender(plan, out)
        for t, s in order:
            b.add(t.index, s, noise[(t.index, s)])
        return out

    in_order = run(units(plan))
    shuffled = units(plan)
    random.Random(seed).shuffle(shuffled)
    assert torch.equal(run(shuffled), in_order)
