"""Exact mode's GroupNorm statistics and band geometry, without ComfyUI."""
from __future__ import annotations

import torch

from parallel_vae.exact import geometry, stats


def large_offset_activation(seed=0, ratio=1000.0):
    """One group whose mean is ``ratio`` times its spread: where float32 sums of squares cancel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 64, 24), generator=g) + ratio
    return x


def band_moments(x, spans, groups=2):
    return [stats.moments(x[:, :, a:e], groups) for a, e in spans]


def reference(x, groups=2):
    d = x.double().reshape(x.shape[0], groups, -1)
    mean = d.mean(-1)
    return mean, torch.rsqrt(d.var(-1, unbiased=False) + 1e-6)


def test_row_moments_over_four_bands_match_a_float64_reference_at_mean_over_std_1000():
    x = large_offset_activation()
    spans = geometry.split_rows(64, 4)
    mean, rstd = stats.combine(band_moments(x, spans), 1e-6)
    ref_mean, ref_rstd = reference(x)
    # float32 row sums after the shift: about float32's own precision, against a spread 1000x
    # smaller than the mean (unshifted float32 sums of squares are off by more than 1e-3, below)
    assert ((rstd - ref_rstd) / ref_rstd).abs().max() < 1e-5
    assert ((mean - ref_mean) / ref_mean).abs().max() < 1e-9


def test_combined_statistics_do_not_depend_on_the_band_split():
    x = torch.randn((2, 8, 37, 24), generator=torch.Generator().manual_seed(3)) * 3 + 5
    first = stats.combine(band_moments(x, [(0, 37)], groups=4), 1e-6)
    for n in (2, 3, 5, 37):
        again = stats.combine(band_moments(x, geometry.split_rows(37, n), groups=4), 1e-6)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1]), n


def test_float32_sums_of_squares_would_fail_the_same_case():
    """The negative control: what the float64 combine avoids (catastrophic cancellation)."""
    x = large_offset_activation()
    ref_mean, ref_rstd = reference(x)
    own = x.reshape(1, 2, -1)
    n = own.shape[-1]
    mean32 = own.sum(-1) / n
    var32 = (own.square().sum(-1) / n - mean32 * mean32).clamp_min(0)
    rstd32 = torch.rsqrt(var32 + 1e-6).double()
    assert ((rstd32 - ref_rstd) / ref_rstd).abs().max() > 1e-3


def test_normalize_applies_the_shared_statistics_like_group_norm():
    x = torch.randn(2, 8, 10, 6)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    mean, rstd = stats.combine([stats.moments(x[:, :, :4], 4), stats.moments(x[:, :, 4:], 4)], norm.eps)
    with torch.no_grad():
        assert (stats.normalize(x, norm, mean, rstd) - norm(x)).abs().max() < 1e-5


def test_moments_travel_as_plain_data():
    m = stats.moments(torch.randn(1, 8, 5, 3), 4)
    back = stats.Moments.from_wire(m.as_wire())
    assert back.count == m.count and torch.equal(back.mean, m.mean) and torch.equal(back.m2, m.m2)


def test_split_rows_covers_every_row_once_in_bands_differing_by_at_most_one():
    for height in (1, 7, 21, 64):
        for n in (1, 2, 3, 4, 9):
            spans = geometry.split_rows(height, n)
            assert spans[0][0] == 0 and spans[-1][1] == height
            assert all(e == a2 for (_, e), (a2, _) in zip(spans, spans[1:]))
            sizes = [e - a for a, e in spans]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_band_count_is_the_memory_bound_of_one_lane():
    # 128 rows x 128 columns (1024 px), tile 512: a band holds at most 32 rows -> 4 bands
    assert geometry.band_count(128, 128, 8, 512) == 4
    assert geometry.band_count(128, 128, 8, 4096) == 1
    assert geometry.band_count(64, 64, 8, 64) == 64  # the memory bound wins over bit-identity
    assert geometry.band_count(3, 8, 8, 8) == 3  # never more bands than rows


def test_channels_last_rows_give_the_same_statistics_and_do_not_depend_on_the_band_split():
    """Exact encoding keeps its bands channels-last (as VAE Encode's input is): the moments are read
    in that order, agree with the NCHW path to float32 row-sum precision, and are bit-identical however the
    rows are cut into bands."""
    x = torch.randn((1, 8, 37, 24), generator=torch.Generator().manual_seed(4)) * 3 + 5
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    whole = stats.combine(band_moments(cl, [(0, 37)], groups=4), 1e-6)
    nchw = stats.combine(band_moments(x, [(0, 37)], groups=4), 1e-6)
    for a, b in zip(whole, nchw):
        assert ((a - b) / b).abs().max() < 1e-6
    for n in (2, 3, 5):
        spans = geometry.split_rows(37, n)
        bands = [cl[:, :, a:e].clone(memory_format=torch.channels_last) for a, e in spans]
        got = stats.combine([stats.moments(band, 4) for band in bands], 1e-6)
        assert all(torch.equal(g, w) for g, w in zip(got, whole)), n


def test_join_rows_stacks_parts_of_any_layout_into_the_bands_layout_copying_each_once():
    g = torch.Generator().manual_seed(3)
    own = torch.randn((1, 8, 6, 5), generator=g).contiguous(memory_format=torch.channels_last)
    above = torch.randn((1, 8, 1, 5), generator=g)  # from the wire: contiguous
    below = torch.zeros((1, 8, 1, 5))
    joined = geometry.join_rows([above, own, below], torch.channels_last)
    assert joined.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(joined, torch.cat([above, own, below], -2))
    # torch.cat of these mixed layouts gives a contiguous tensor: the transposing copy join_rows avoids
    assert not torch.cat([above, own, below], -2).is_contiguous(memory_format=torch.channels_last)
    padded = geometry.join_rows([own, below], torch.channels_last, zero_cols=1)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded, torch.nn.functional.pad(torch.cat([own, below], -2), (0, 1, 0, 0)))
    assert torch.equal(geometry.join_rows([above, own], torch.contiguous_format), torch.cat([above, own], -2))


def test_doubled_inner_equals_upsample_x2_without_the_edge_rows_and_reuses_its_memory():
    from parallel_vae.exact import wan_rows

    up = torch.nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
    g = torch.Generator().manual_seed(3)
    space = None
    for shape in [(2, 5, 7, 6), (2, 5, 3, 6), (1, 4, 9, 5)]:  # a smaller chunk after a larger one, then a larger
        src = torch.randn(shape, generator=g)
        want = up(src).narrow(-2, 1, 2 * shape[-2] - 2).contiguous()
        got, grown = wan_rows.doubled_inner(src, space)
        assert got.is_contiguous() and torch.equal(got, want), shape
        if space is not None and space.numel() >= got.numel():
            assert grown is space and got.data_ptr() == space.data_ptr(), "written into the given memory"
        space = grown
