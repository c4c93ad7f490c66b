"""Exact mode: rows shared out by device speed and memory (exact/shares.py), without ComfyUI."""
from __future__ import annotations

from parallel_vae.exact.geometry import MIN_BAND_ROWS
from parallel_vae.exact.shares import Terms, split


def rows_of(result) -> dict[str, int]:
    return {name: bands[-1][1] - bands[0][0] for name, bands in result.owners}


def check_cover(result, height):
    spans = result.spans
    assert spans[0][0] == 0 and spans[-1][1] == height
    assert all(a < e for a, e in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_rows_follow_speed_and_cover_the_image_top_to_bottom():
    result = split(128, [Terms("a", 1.0), Terms("b", 3.0)])
    check_cover(result, 128)
    assert rows_of(result) == {"a": 32, "b": 96}
    assert [name for name, _ in result.owners] == ["a", "b"]
    even = split(21, [Terms("a"), Terms("b")])
    assert rows_of(even) == {"a": 11, "b": 10}  # the remainder goes to the top


def test_a_device_with_less_memory_gets_fewer_rows_and_the_rest_goes_to_the_others():
    result = split(120, [Terms("small", 1.0, max_rows=20), Terms("a", 1.0), Terms("b", 1.0)])
    check_cover(result, 120)
    assert rows_of(result) == {"small": 20, "a": 50, "b": 50}
    # a fast device that is capped passes its excess on in proportion to the others' speeds
    capped = split(100, [Terms("fast", 4.0, max_rows=40), Terms("a", 1.0), Terms("b", 2.0)])
    assert rows_of(capped) == {"fast": 40, "a": 20, "b": 40}


def test_when_every_device_is_full_the_rows_follow_the_caps():
    result = split(100, [Terms("a", 5.0, max_rows=10), Terms("b", 1.0, max_rows=30)])
    check_cover(result, 100)
    assert rows_of(result) == {"a": 25, "b": 75}


def test_band_rows_bound_each_band_and_bands_stay_tall_enough():
    result = split(64, [Terms("a", band_rows=10), Terms("b", band_rows=64)])
    bands = dict(result.owners)
    assert [e - a for a, e in bands["a"]] == [8, 8, 8, 8] and [e - a for a, e in bands["b"]] == [32]
    # the memory bound wins over the bit-identity floor when it asks for shorter bands
    short = split(16, [Terms("a", band_rows=4)])
    assert [e - a for a, e in short.spans] == [4, 4, 4, 4]


def test_a_device_whose_share_would_be_a_sliver_is_left_out_slowest_first():
    result = split(40, [Terms("slow", 0.1), Terms("a", 1.0), Terms("b", 1.0)])
    check_cover(result, 40)
    assert rows_of(result) == {"a": 20, "b": 20}
    assert all(n >= MIN_BAND_ROWS for n in rows_of(split(30, [Terms(str(i)) for i in range(8)])).values())
    assert rows_of(split(5, [Terms("a"), Terms("b")])) == {"a": 5}  # too short to share


def test_lanes_are_kept_when_memory_needs_that_many_bands_anyway():
    result = split(21, [Terms(str(i), band_rows=10) for i in range(3)])
    assert rows_of(result) == {"0": 7, "1": 7, "2": 7}
