"""Tile plans: exact expected plans for a few shapes, and ComfyUI's pixel -> latent conversion."""
import pytest

from parallel_vae import plan as P
from parallel_vae.errors import InputError


def test_axis_spans_walk_like_tiled_scale_multidim():
    assert P.axis_spans(10, 4, 2) == [(0, 4), (2, 4), (4, 4), (6, 4)]
    assert P.axis_spans(14, 8, 2) == [(0, 8), (6, 8)]
    # the last tile is clamped to start at size-overlap at most, so it can be short: not shifted back
    assert P.axis_spans(13, 8, 2) == [(0, 8), (6, 7)]
    assert P.axis_spans(8, 8, 2) == [(0, 8)]
    assert P.axis_spans(3, 8, 2) == [(0, 3)]
    assert P.axis_spans(9, 4, 0) == [(0, 4), (4, 4), (8, 1)]


def test_axis_spans_rejects_overlap_not_smaller_than_tile():
    with pytest.raises(ValueError):
        P.axis_spans(10, 2, 2)


@pytest.mark.parametrize("args, expected", [
    # tile_size, overlap, temporal_size, temporal_overlap, spatial, temporal -> latent units
    ((512, 64, 64, 8, 8, 4), P.TileSettings(64, 8, 16, 2)),
    ((512, 64, 64, 8, 8, None), P.TileSettings(64, 8, None, None)),
    ((64, 32, 64, 8, 8, None), P.TileSettings(8, 2)),  # overlap > tile/4 -> clamped to tile/4
    ((256, 32, 8, 4, 16, 4), P.TileSettings(16, 2, 2, 1)),
    ((96, 24, 12, 8, 8, 4), P.TileSettings(12, 3, 3, 1)),  # temporal_overlap*2 > size -> halved
])
def test_settings_from_pixels_match_vae_decode_tiled(args, expected):
    assert P.settings_from_pixels(*args) == expected


@pytest.mark.parametrize("args, name, fragment", [
    ((32, 0, 64, 8), "tile_size", "outside the allowed 64..4096"),
    ((8192, 0, 64, 8), "tile_size", "outside the allowed 64..4096"),
    ((64, -1, 64, 8), "overlap", "negative"),
    ((64, 64, 64, 8), "overlap", "smaller than tile_size"),
    ((64, 100, 64, 8), "overlap", "smaller than tile_size"),
    ((64, 16, 4, 4), "temporal_size", "outside the allowed 8..4096 frames"),
    ((64, 16, 8192, 8), "temporal_size", "outside the allowed 8..4096 frames"),
    ((64, 16, 64, 2), "temporal_overlap", "below the minimum of 4"),
    ((64, 16, 16, 16), "temporal_overlap", "smaller than temporal_size"),
    ((64.0, 16, 64, 8), "tile_size", "must be an integer"),
])
def test_invalid_settings_name_the_input(args, name, fragment):
    with pytest.raises(InputError) as e:
        P.validate_settings(*args)
    assert e.value.input_name == name
    assert str(e.value).startswith(f"{name}: ")
    assert fragment in str(e.value)


def test_image_plan_three_grids_exact():
    s = P.TileSettings(8, 2)
    p = P.plan_image((1, 4, 10, 14), s, P.AxisScale(8))
    assert p.passes == 3 and p.out_shape == (1, 3, 80, 112)
    by_pass = [[(t.in_start, t.in_size) for t in p.tiles if t.pass_index == k] for k in range(3)]
    # pass 0: 16 rows x 4 cols, pass 1: 4 rows x 16 cols, pass 2: 8 x 8 (VAE.decode_tiled_)
    assert by_pass[0] == [((0, c), (10, 4)) for c in (0, 2, 4, 6, 8, 10)]
    assert by_pass[1] == [((r, 0), (4, 14)) for r in (0, 2, 4, 6)]
    assert by_pass[2] == [((0, 0), (8, 8)), ((0, 6), (8, 8)), ((6, 0), (4, 8)), ((6, 6), (4, 8))]
    t = p.tiles[-1]
    assert (t.out_start, t.out_size, t.feather, t.whole) == ((48, 48), (32, 64), (16, 16), False)
    assert [t.index for t in p.tiles] == list(range(len(p.tiles)))


def test_image_plan_small_item_is_one_whole_tile_per_pass():
    p = P.plan_image((2, 4, 4, 4), P.TileSettings(8, 2), P.AxisScale(8))
    # pass 1 (4 x 16) and pass 0 (16 x 4) fit exactly; every pass is one unmasked tile per item
    assert len(p.tiles) == 6 and all(t.whole and t.feather == (0, 0) for t in p.tiles)
    assert [t.batch for t in p.tiles] == [0, 0, 0, 1, 1, 1]
    assert p.tiles_of(1) == p.tiles[3:]


def test_causal_plan_spans_all_frames_and_steps_like_the_vae():
    scales = (P.AxisScale(4, 3), P.AxisScale(8), P.AxisScale(8))
    p = P.plan_causal((1, 16, 3, 10, 14), P.TileSettings(8, 2, 2, 1), scales)
    assert p.out_shape == (1, 3, 9, 80, 112)
    assert p.step_frames == ((0, 1), (1, 5), (5, 9))
    assert [(t.in_start, t.in_size) for t in p.tiles] == [
        ((0, 0, 0), (3, 8, 8)), ((0, 0, 6), (3, 8, 8)), ((0, 6, 0), (3, 4, 8)), ((0, 6, 6), (3, 4, 8))]
    assert all(t.feather == (0, 16, 16) for t in p.tiles)  # never a temporal ramp: time is never cut
    assert p.units == 4 * 3


def test_video_plan_cuts_time_like_decode_tiled_3d():
    scales = (P.AxisScale(8, 7), P.AxisScale(32), P.AxisScale(32))  # LTXV-like geometry
    p = P.plan_video((1, 128, 5, 4, 4), P.TileSettings(4, 1, 2, 1), scales)
    assert p.out_shape == (1, 3, 33, 128, 128)
    assert [(t.in_start[0], t.in_size[0], t.out_start[0], t.out_size[0]) for t in p.tiles] == [
        (0, 2, 0, 9), (1, 2, 8, 9), (2, 2, 16, 9), (3, 2, 24, 9)]
    assert all(t.feather == (1, 32, 32) for t in p.tiles)
