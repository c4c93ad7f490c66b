"""Blender bookkeeping: bad shapes, duplicates, the finish hook, and three-pass averaging."""
import pytest
import torch

from parallel_vae import plan as P
from parallel_vae.blend import Blender, allocate_output, feather_mask
from parallel_vae.errors import DecodeError


def image_plan():
    return P.plan_image((2, 1, 10, 14), P.TileSettings(8, 2), P.AxisScale(2), 3)


def test_output_is_channels_last_storage_filled_through_the_view():
    plan = image_plan()
    storage, view = allocate_output(plan)
    assert storage.shape == (2, 20, 28, 3) and view.shape == (2, 3, 20, 28)
    assert storage.is_contiguous() and view.data_ptr() == storage.data_ptr()
    view[1, 2, 3, 4] = 7.0
    assert storage[1, 3, 4, 2] == 7.0


def test_wrong_tile_shape_is_a_decode_error():
    plan = image_plan()
    b = Blender(plan, allocate_output(plan)[1])
    with pytest.raises(DecodeError, match=r"expected \(1, 3, 20, 8\)"):
        b.add(0, 0, torch.zeros(1, 3, 20, 9))


def test_a_tile_cannot_be_blended_twice():
    plan = image_plan()
    b = Blender(plan, allocate_output(plan)[1])
    t = plan.tiles[1]
    b.add(1, 0, torch.zeros((1, 3) + t.out_size))  # early: waits for tile 0
    with pytest.raises(ValueError, match="already blended"):
        b.add(1, 0, torch.zeros((1, 3) + t.out_size))


def test_finish_runs_once_per_item_after_the_three_passes_are_averaged():
    plan = image_plan()
    storage, out = allocate_output(plan)
    seen = []

    def finish(segment, region):
        seen.append((segment.batch, region.shape))
        region.mul_(2)

    b = Blender(plan, out, finish)
    for t in plan.tiles:
        # each pass returns a different constant: the average is (1+2+3)/3 = 2, then doubled by finish
        b.add(t.index, 0, torch.full((1, 3) + t.out_size, float(t.pass_index + 1)))
    assert seen == [(0, (1, 3, 20, 28)), (1, (1, 3, 20, 28))]
    assert torch.allclose(storage, torch.full_like(storage, 4.0))
    assert b.complete


def test_feather_mask_matches_comfyui_ramps():
    m = feather_mask((6,), (2,))[0, 0]
    assert m.tolist() == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    # a tile shorter than both ramps gets both factors, as ComfyUI's in-place products give
    m = feather_mask((5,), (4,))[0, 0]
    assert m.tolist() == [0.25, 0.5, 0.75 * 0.75, 0.5, 0.25]
    assert feather_mask((2,), (2,))[0, 0].tolist() == [1.0, 1.0]  # feather >= size: no ramp


def video_plan(batch=2):
    """A non-causal video plan: 4 latent frames x 2 rows x 2 columns of tiles per item, time in
    tiles of 4 with overlap 2 (4 temporal windows), 4x in time (the first frame decodes to one)."""
    return P.plan_video((batch, 2, 9, 6, 6), P.TileSettings(4, 1, 4, 2),
                        (P.AxisScale(4, 3), P.AxisScale(2), P.AxisScale(2)), 3)


def test_a_streamed_non_causal_video_leaves_frame_runs_as_their_last_tile_is_blended_bit_identical():
    plan = video_plan()
    gen = torch.Generator().manual_seed(0)
    pixels = {t.index: torch.rand((1, 3) + t.out_size, generator=gen) for t in plan.tiles}
    storage, out = allocate_output(plan)
    canvas = Blender(plan, out)
    rolling = Blender(plan, None)
    assert rolling.rolling and not canvas.rolling
    got = {b: [] for b in range(plan.batch)}
    for t in plan.tiles:
        canvas.add(t.index, 0, pixels[t.index])
        for seg in rolling.add(t.index, 0, pixels[t.index]):
            following = [u for u in plan.tiles_of(t.batch) if u.index > t.index]
            # released as soon as no later tile covers its frames, not at the item's end
            assert all(u.out_start[0] >= seg.frames[1] for u in following)
            assert following == [] or seg.frames[1] == following[0].out_start[0]
            got[seg.batch].append((seg.frames, rolling.take(seg)))
    assert canvas.complete and rolling.complete
    for b, runs in got.items():
        assert len(runs) == len({t.in_start[0] for t in plan.tiles_of(b)}) == 4  # one run per window
        assert [f for f, _ in runs] == sorted(f for f, _ in runs) and runs[0][0][0] == 0
        assert torch.equal(torch.cat([px for _, px in runs], 2), out[b:b + 1])


def test_a_rolling_blend_holds_tiles_that_arrive_early_until_their_turn():
    plan = video_plan(batch=1)
    tiles = list(plan.tiles)
    rolling = Blender(plan, None)
    last = tiles[-1]
    assert rolling.add(last.index, 0, torch.zeros((1, 3) + last.out_size)) == []  # waits for the others
    released = [s for t in tiles[:-1] for s in rolling.add(t.index, 0, torch.zeros((1, 3) + t.out_size))]
    assert rolling.complete and released[-1].frames[1] == plan.out_shape[2]
