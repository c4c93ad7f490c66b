"""Exact mode geometry: row bands and the plan that carries them.

A band owns latent rows ``[a, e)`` of one batch item and reads no others: what its layers read
beyond its edges (conv edge rows, statistics, attention keys) its neighbours send as they go.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..plan import CAUSAL, IMAGE, VIDEO, AxisScale, Plan, Tile
from ..plan_encode import down_scales

# oneDNN takes another conv algorithm for inputs a few rows high, whose rows differ from a tall
# input's in the last bit: bands of at least this many latent rows keep the output bit-identical
# whatever the band count (unless tile_size asks for smaller ones)
MIN_BAND_ROWS = 8


@dataclass(frozen=True)
class Band:
    """An exact band: the plan's tile ``index`` owns latent rows ``[a, e)`` of its batch item."""

    index: int
    a: int
    e: int

    @property
    def rows(self) -> int:
        return self.e - self.a


def row_part(value):
    """The rows' entry of a conv's setting (kernel_size, stride, padding, dilation): one value for
    every axis, or one per axis with rows second to last."""
    return value[-2] if isinstance(value, (tuple, list)) else value


def conv_spread(module) -> int:
    """Rows a conv reads beyond its output row on each side (0 for 1x1 and time-only kernels)."""
    k = module.kernel_size
    d = getattr(module, "dilation", 1)
    kh, dh = row_part(k), row_part(d)
    return dh * (kh - 1) // 2


@contextmanager
def rows_unpadded(conv):
    """``conv`` with no padding over rows while the calling band convolves [above; own; below] (the
    rows beyond its edges given, zero rows at the image's edge): its output is then exactly the
    band's own rows, none computed to be cut away. One band convolves at a time."""
    before = conv.padding
    if row_part(before) == 0:
        yield
        return
    conv.padding = tuple(before[:-2]) + (0,) + tuple(before[-1:])
    try:
        yield
    finally:
        conv.padding = before


def edge_rows(own, got, spread: int):
    """The ``spread`` rows beyond one edge of ``own``: the neighbour's (``got``), or zeros at the image's edge."""
    return got if got is not None else own.new_zeros(own.shape[:-2] + (spread,) + own.shape[-1:])


def join_rows(parts: Sequence, fmt=torch.contiguous_format, zero_cols: int = 0):
    """``parts`` one below the other in one fresh tensor in layout ``fmt``, with ``zero_cols`` zero
    columns on the right; each part is copied once. ``torch.cat`` writes parts of mixed layouts
    (a channels_last band, rows from the wire or zeros) into a contiguous tensor, a transposing
    copy to be transposed back: two slow copies of a band-sized tensor per conv (41% of a worker's
    time in a 1024x1024 SD encode at one thread)."""
    first = parts[0]
    width = first.shape[-1]
    out = torch.empty(first.shape[:-2] + (sum(p.shape[-2] for p in parts), width + zero_cols),
                      dtype=first.dtype, device=first.device, memory_format=fmt)
    at = 0
    for part in parts:
        out[..., at:at + part.shape[-2], :width].copy_(part)
        at += part.shape[-2]
    if zero_cols:
        out[..., width:].zero_()
    return out


def named(module, name: str) -> bool:
    """Whether ``module`` is ComfyUI's class ``name`` (this package never imports ComfyUI)."""
    return type(module).__name__ == name


def is_conv(module) -> bool:
    return hasattr(module, "kernel_size") and hasattr(module, "weight") and module.weight is not None \
        and module.weight.dim() >= 4


def upsample_factor(module) -> Optional[int]:
    """The spatial factor of an upsampling layer (nearest, integer), or None for other layers."""
    if "Upsample" not in type(module).__name__ or not hasattr(module, "scale_factor"):
        return None
    f = module.scale_factor
    f = f[-1] if isinstance(f, (tuple, list)) else f
    return int(f)


def split_rows(height: int, bands: int) -> list[tuple[int, int]]:
    """``bands`` runs of rows covering ``[0, height)``, sizes differing by at most one."""
    bands = max(1, min(bands, height))
    base, extra = divmod(height, bands)
    spans, a = [], 0
    for i in range(bands):
        e = a + base + (1 if i < extra else 0)
        spans.append((a, e))
        a = e
    return spans


def band_count(height: int, width: int, px_per_row: int, tile_size: int) -> int:
    """How many bands for one lane: enough that a band's own rows hold at most tile_size x tile_size
    output pixels (the memory bound, as a tile)."""
    rows_max = max(1, (tile_size * tile_size) // max(1, width * px_per_row * px_per_row))
    return min(height, -(-height // rows_max))


def plan_exact(in_shape: Sequence[int], scales: Sequence[AxisScale], out_channels: int,
               spans: Sequence[tuple[int, int]], shares: tuple = ()) -> Plan:
    """A plan whose tiles are the bands ``spans`` (latent rows [a, e), top to bottom) of each batch
    item: own rows only, no feather, one pass, so the blender writes each band's pixels where they
    belong unchanged. ``shares``: see Plan.shares."""
    shape = tuple(in_shape)
    causal = len(shape) == 5
    width = shape[-1]
    sh, sw = scales[-2], scales[-1]
    tiles: list[Tile] = []
    for b in range(shape[0]):
        for a, e in spans:
            if causal:
                frames = shape[2]
                in_start, in_size = (0, a, 0), (frames, e - a, width)
                out_start = (0, sh.offset(a), 0)
                out_size = (scales[0].size(frames), sh.factor * (e - a), sw.size(width))
            else:
                in_start, in_size = (a, 0), (e - a, width)
                out_start, out_size = (sh.offset(a), 0), (sh.factor * (e - a), sw.size(width))
            tiles.append(Tile(index=len(tiles), batch=b, pass_index=0, in_start=in_start, in_size=in_size,
                              out_start=out_start, out_size=out_size, feather=(0,) * len(in_start), whole=False))
    out_shape = (shape[0], out_channels) + tuple(s.size(n) for s, n in zip(scales, shape[2:]))
    steps = ()
    if causal:
        ts = scales[0]
        steps = tuple((ts.size(i), ts.size(i + 1)) for i in range(shape[2]))
    return Plan(CAUSAL if causal else IMAGE, shape, out_shape, tuple(scales), 1, tuple(tiles), steps,
                mode="exact", shares=tuple(shares))


def plan_exact_encode(in_shape: Sequence[int], scales: Sequence[AxisScale], latent_channels: int,
                      spans: Sequence[tuple[int, int]], shares: tuple = ()) -> Plan:
    """Exact encoding's plan: the bands ``spans`` (latent rows [a, e)) of each item, each reading
    the pixel rows [a*f, e*f) and giving its latent rows, every frame at once; one pass, no feather."""
    shape = tuple(in_shape)
    video = len(shape) == 5
    f = scales[-2].factor
    down = down_scales(tuple(scales))
    height, width = shape[-2], shape[-1]
    w_lat = down[-1].canvas(width)
    tiles: list[Tile] = []
    for b in range(shape[0]):
        for a, e in spans:
            rows = (a * f, min(height, e * f) - a * f)
            if video:
                frames = shape[2]
                in_start, in_size = (0, rows[0], 0), (frames, rows[1], width)
                out_start, out_size = (0, a, 0), (down[0].canvas(frames), e - a, w_lat)
            else:
                in_start, in_size = (rows[0], 0), (rows[1], width)
                out_start, out_size = (a, 0), (e - a, w_lat)
            tiles.append(Tile(index=len(tiles), batch=b, pass_index=0, in_start=in_start, in_size=in_size,
                              out_start=out_start, out_size=out_size, feather=(0,) * len(in_start), whole=False))
    out_shape = (shape[0], latent_channels) + tuple(s.canvas(n) for s, n in zip(down, shape[2:]))
    return Plan(VIDEO if video else IMAGE, shape, out_shape, down, 1, tuple(tiles), mode="exact",
                shares=tuple(shares), direction="encode")


def bands_of(plan: Plan, batch: int) -> list[Band]:
    """The bands of one batch item, top to bottom."""
    axis = len(plan.in_shape) - 4  # rows: (H, W) or (T, H, W)
    return [Band(t.index, t.in_start[axis], t.in_start[axis] + t.in_size[axis]) for t in plan.tiles_of(batch)]


__all__ = ["Band", "band_count", "bands_of", "conv_spread", "edge_rows", "named", "plan_exact", "plan_exact_encode",
           "row_part", "rows_unpadded", "split_rows"]
