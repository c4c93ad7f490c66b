"""Tile geometry in latent and pixel space: pure functions over frozen records.

The grid, the per-axis lengths, the output offsets and the feather widths reproduce ComfyUI's
``comfy.utils.tiled_scale_multidim`` and the way ``VAE.decode_tiled_`` / ``decode_tiled_3d`` call
it, so a plan decoded and blended in plan order equals ComfyUI's VAEDecodeTiled.

Axes: a latent is ``[B, C, *axes]`` with axes ``(H, W)`` for images and ``(T, H, W)`` for video.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

from .errors import InputError

IMAGE, VIDEO, CAUSAL = "image", "video", "causal"

# The node's limits, shared with its schema so validation and UI agree (VAEDecodeTiled's values).
TILE_MIN, TILE_MAX = 64, 4096
TILE_AUTO = 0  # tile_size 0: chosen per decode from free memory (sizing.py)
TEMPORAL_MIN, TEMPORAL_MAX, TEMPORAL_OVERLAP_MIN = 8, 4096, 4


@dataclass(frozen=True)
class AxisScale:
    """Latent -> pixel mapping along one axis, as ComfyUI's VAE defines it.

    ``size(n) = max(0, n*factor - trim)``; ``offset(pos) = pos*factor``. Causal time axes have
    ``trim = factor - 1`` (the first latent frame decodes to one frame), spatial axes ``trim = 0``.
    """

    factor: int
    trim: int = 0

    def size(self, n: int) -> int:
        return max(0, n * self.factor - self.trim)

    def offset(self, pos: int) -> int:
        return pos * self.factor

    def canvas(self, n: int) -> int:
        """The output's length for an input of ``n`` (decoding: what a tile of ``n`` gives)."""
        return self.size(n)

    def feather(self, overlap: int) -> int:
        return self.size(overlap)


@dataclass(frozen=True)
class DownScale:
    """Pixel -> latent mapping along one axis, as ComfyUI's tiled encode (``tiled_scale_multidim``
    with a downscale) uses it: the canvas and the feathers are ``round(n / factor)`` on spatial
    axes and ComfyUI's frame formula ``(n + trim) // factor`` on a time axis; a tile's own latent
    length is what the encoder gives (stride-2 convs over a one-row pad: ``ceil(n / factor)``);
    a tile lands at ``round(pos / factor)``. The blender cuts a tile that overhangs the canvas,
    as ComfyUI does."""

    factor: int
    trim: int = 0
    temporal: bool = False

    def size(self, n: int) -> int:
        if self.temporal:
            return max(0, (n + self.trim) // self.factor)
        return -(-n // self.factor)

    def canvas(self, n: int) -> int:
        return self.size(n) if self.temporal else round(n / self.factor)

    def offset(self, pos: int) -> int:
        return round(pos / self.factor)

    def feather(self, overlap: int) -> int:
        return self.size(overlap) if self.temporal else round(overlap / self.factor)


@dataclass(frozen=True)
class Tile:
    """One decode call: a latent box and where its pixels land, plus its feather widths."""

    index: int  # position in plan order: blending in this order reproduces ComfyUI bit for bit
    batch: int
    pass_index: int  # image plans average three grids, like VAEDecodeTiled
    in_start: tuple[int, ...]
    in_size: tuple[int, ...]
    out_start: tuple[int, ...]
    out_size: tuple[int, ...]
    feather: tuple[int, ...]  # ramp width per axis; 0 means no ramp on that axis
    whole: bool  # the tile is the whole item: its pixels are written as they are (no mask)

    @property
    def volume(self) -> int:
        return math.prod(self.in_size)


@dataclass(frozen=True)
class TileSettings:
    """Tile geometry in latent units, after VAEDecodeTiled's pixel -> latent conversion."""

    tile: int
    overlap: int
    tile_t: Optional[int] = None
    overlap_t: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    kind: str  # IMAGE | VIDEO | CAUSAL
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]  # [B, C_out, *axes] in pixels
    scales: tuple[AxisScale, ...]
    passes: int
    tiles: tuple[Tile, ...]
    # CAUSAL only: output frame range [start, stop) of each latent frame (one decode step each).
    step_frames: tuple[tuple[int, int], ...] = ()
    # "tiled" (VAEDecodeTiled's grid) or "exact" (row bands of the untiled decode, exact/geometry.py)
    mode: str = "tiled"
    # exact mode on workers: (lane name, bands of each item) top to bottom, where rows were
    # shared out by lane speed and memory (exact/shares.py); empty: any even grouping
    shares: tuple[tuple[str, int], ...] = ()
    # "decode" (latent in, pixels out) or "encode" (pixels in, latent out): in_shape and the
    # tiles' in_* boxes are in the input's units, out_* in the output's
    direction: str = "decode"

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    @property
    def batch(self) -> int:
        return self.in_shape[0]

    @property
    def steps(self) -> int:
        return len(self.step_frames) if self.kind == CAUSAL else 1

    @property
    def frames(self) -> int:
        """Output frames as ComfyUI's IMAGE batch counts them: batch items x frames per item."""
        return self.out_shape[0] * (self.out_shape[2] if len(self.out_shape) == 5 else 1)

    @property
    def units(self) -> int:
        """Progress units: one per tile, times the decode steps of causal tiles."""
        return len(self.tiles) * self.steps

    def tiles_of(self, batch: int) -> tuple[Tile, ...]:
        """The tiles of one batch item, every pass, in plan order.

        Every item has the same grid, so each owns an equal, contiguous run of the plan.
        """
        if not 0 <= batch < self.batch:
            raise IndexError(f"batch {batch} is outside 0..{self.batch - 1}")
        n = len(self.tiles) // self.batch
        return self.tiles[batch * n:(batch + 1) * n]


def validate_settings(tile_size: int, overlap: int, temporal_size: int, temporal_overlap: int) -> None:
    """The node's rules for its pixel-unit inputs. Raises InputError naming the input.

    Core VAEDecodeTiled clamps ``overlap`` to ``tile_size // 4`` when it is larger, and halves
    ``temporal_overlap`` when it exceeds half of ``temporal_size``; we do the same so outputs stay
    equal. An overlap as large as the tile itself has no sensible meaning and is an error.
    """
    for name, value in (("tile_size", tile_size), ("overlap", overlap),
                        ("temporal_size", temporal_size), ("temporal_overlap", temporal_overlap)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(name, f"must be an integer, got {value!r}")
    if tile_size != TILE_AUTO and not TILE_MIN <= tile_size <= TILE_MAX:
        raise InputError("tile_size", f"{tile_size} px is outside the allowed {TILE_MIN}..{TILE_MAX} px "
                                      f"(or 0: auto, from free memory)")
    if overlap < 0:
        raise InputError("overlap", f"{overlap} px is negative; use 0..tile_size-1")
    if tile_size != TILE_AUTO and overlap >= tile_size:
        raise InputError("overlap", f"{overlap} px must be smaller than tile_size ({tile_size} px); "
                                    f"values above tile_size/4 are clamped to tile_size/4 like VAEDecodeTiled")
    if not TEMPORAL_MIN <= temporal_size <= TEMPORAL_MAX:
        raise InputError("temporal_size", f"{temporal_size} frames is outside the allowed "
                                          f"{TEMPORAL_MIN}..{TEMPORAL_MAX} frames")
    if temporal_overlap < TEMPORAL_OVERLAP_MIN:
        raise InputError("temporal_overlap",
                         f"{temporal_overlap} frames is below the minimum of {TEMPORAL_OVERLAP_MIN}")
    if temporal_overlap >= temporal_size:
        raise InputError("temporal_overlap", f"{temporal_overlap} frames must be smaller than temporal_size "
                                             f"({temporal_size} frames)")


def settings_from_pixels(tile_size: int, overlap: int, temporal_size: int, temporal_overlap: int,
                         spatial_compression: int, temporal_compression: Optional[int]) -> TileSettings:
    """VAEDecodeTiled's conversion of its pixel inputs to latent units (nodes.py, 0.3.75)."""
    validate_settings(tile_size, overlap, temporal_size, temporal_overlap)
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    if temporal_size < temporal_overlap * 2:
        temporal_overlap = temporal_overlap // 2
    tile_t = overlap_t = None
    if temporal_compression is not None:
        tile_t = max(2, temporal_size // temporal_compression)
        overlap_t = max(1, min(tile_t // 2, temporal_overlap // temporal_compression))
    return TileSettings(tile_size // spatial_compression, overlap // spatial_compression, tile_t, overlap_t)


def axis_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of each tile along one axis, exactly as tiled_scale_multidim walks it.

    The last tile is not shifted back: it is clamped to start at ``size - overlap`` at most and
    may be shorter than ``tile``.
    """
    if size <= tile:
        return [(0, size)]
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    spans = []
    for it in range(0, size - overlap, tile - overlap):
        pos = max(0, min(size - overlap, it))
        spans.append((pos, min(tile, size - pos)))
    return spans


def grid(batch: int, axes: tuple[int, ...], tile: tuple[int, ...], overlap: tuple[int, ...],
          scales: tuple[AxisScale, ...], pass_index: int, first_index: int,
          feather_axes: tuple[bool, ...]) -> list[Tile]:
    whole = all(n <= t for n, t in zip(axes, tile))
    if whole:
        spans = [[(0, n)] for n in axes]
    else:
        spans = [axis_spans(n, t, o) for n, t, o in zip(axes, tile, overlap)]
    feather = tuple(s.feather(o) if use else 0 for s, o, use in zip(scales, overlap, feather_axes))
    tiles = []
    for combo in itertools.product(*spans):
        starts = tuple(p for p, _ in combo)
        sizes = tuple(n for _, n in combo)
        tiles.append(Tile(
            index=first_index + len(tiles), batch=batch, pass_index=pass_index,
            in_start=starts, in_size=sizes,
            out_start=tuple(s.offset(p) for s, p in zip(scales, starts)),
            out_size=tuple(s.size(n) for s, n in zip(scales, sizes)),
            feather=(0,) * len(axes) if whole else feather, whole=whole))
    return tiles


def out_shape_of(in_shape, out_channels, scales) -> tuple[int, ...]:
    return (in_shape[0], out_channels) + tuple(s.canvas(n) for s, n in zip(scales, in_shape[2:]))


def plan_image(in_shape: tuple[int, ...], settings: TileSettings, scale: AxisScale,
               out_channels: int = 3) -> Plan:
    """Three grids per item, averaged, as ``VAE.decode_tiled_``: (t/2 x 2t), (2t x t/2), (t x t).

    ``tiled_scale(samples, fn, tile_x, tile_y)`` tiles (H, W) with (tile_y, tile_x), and
    decode_tiled_ calls it with (tile_x//2, tile_y*2), (tile_x*2, tile_y//2), (tile_x, tile_y).
    """
    if len(in_shape) != 4:
        raise ValueError(f"image plans take [B, C, H, W] latents, got {in_shape}")
    t, o = settings.tile, settings.overlap
    grids = [(t * 2, t // 2), (t // 2, t * 2), (t, t)]  # (H, W) per pass
    scales = (scale, scale)
    tiles: list[Tile] = []
    for b in range(in_shape[0]):
        for p, hw in enumerate(grids):
            tiles += grid(b, tuple(in_shape[2:]), hw, (o, o), scales, p, len(tiles), (True, True))
    return Plan(IMAGE, tuple(in_shape), out_shape_of(in_shape, out_channels, scales), scales, 3,
                tuple(tiles))


def plan_video(in_shape: tuple[int, ...], settings: TileSettings, scales: tuple[AxisScale, ...],
               out_channels: int = 3) -> Plan:
    """One 3-D grid per item, as ``VAE.decode_tiled_3d`` with VAEDecodeTiled's arguments."""
    if len(in_shape) != 5:
        raise ValueError(f"video plans take [B, C, T, H, W] latents, got {in_shape}")
    tile = (max(2, settings.tile_t), settings.tile, settings.tile)
    overlap = (max(1, settings.overlap_t), settings.overlap, settings.overlap)
    tiles: list[Tile] = []
    for b in range(in_shape[0]):
        tiles += grid(b, tuple(in_shape[2:]), tile, overlap, scales, 0, len(tiles), (True, True, True))
    return Plan(VIDEO, tuple(in_shape), out_shape_of(in_shape, out_channels, scales), scales, 1,
                tuple(tiles))


def plan_causal(in_shape: tuple[int, ...], settings: TileSettings, scales: tuple[AxisScale, ...],
                out_channels: int = 3) -> Plan:
    """Spatial tiles that each span every frame, decoded step by step with their causal cache.

    Equals VAEDecodeTiled with a temporal tile covering all frames: there the temporal ramp is
    the same for every tile and cancels in the weighted average, so it is left out here.
    """
    if len(in_shape) != 5:
        raise ValueError(f"video plans take [B, C, T, H, W] latents, got {in_shape}")
    frames = in_shape[2]
    tile = (frames, settings.tile, settings.tile)
    overlap = (0, settings.overlap, settings.overlap)
    tiles: list[Tile] = []
    for b in range(in_shape[0]):
        tiles += grid(b, tuple(in_shape[2:]), tile, overlap, scales, 0, len(tiles), (False, True, True))
    ts = scales[0]
    steps = tuple((ts.size(i), ts.size(i + 1)) for i in range(frames))
    return Plan(CAUSAL, tuple(in_shape), out_shape_of(in_shape, out_channels, scales), scales, 1,
                tuple(tiles), steps)
