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
