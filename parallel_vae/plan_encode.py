"""Tile geometry for encoding: the plans of ComfyUI's VAE Encode (Tiled), made of the same tiles
and blended by the same blender as decoding, with the axes running from pixels to latent.

``VAE.encode_tiled_`` (image VAEs) averages three grids over the pixels, (t x t), (t/2 x 2t),
(2t x t/2) as (H, W), in that order; ``encode_tiled_3d`` (video VAEs) walks one 3-D grid with the
temporal tile and overlap rounded through the VAE's frame formula. Causal video VAEs are never cut
in time: their spatial tiles span every frame (VAE Encode (Tiled) with a temporal tile covering the
video; the temporal feather is then the same for every tile and cancels, so it is left out).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .plan import IMAGE, VIDEO, AxisScale, DownScale, Plan, Tile, grid, out_shape_of, validate_settings


@dataclass(frozen=True)
class EncodeSettings:
    """VAE Encode (Tiled)'s inputs in pixels and frames, as ComfyUI hands them to the grid."""

    tile: int
    overlap: int
    tile_t: int = 0  # frames per temporal tile (video VAEs)
    overlap_t: int = 0


def down_scales(scales: tuple[AxisScale, ...]) -> tuple[DownScale, ...]:
    """The encode mapping of each axis of a VAE whose decode mapping is ``scales``."""
    if len(scales) == 3:
        t = scales[0]
        return (DownScale(t.factor, t.trim, temporal=True), DownScale(scales[1].factor), DownScale(scales[2].factor))
    return tuple(DownScale(s.factor) for s in scales)


def frames_in(scales: tuple[AxisScale, ...], frames: int) -> int:
    """The frames a video VAE encodes of ``frames``: ComfyUI drops those that make no latent frame."""
    t = scales[0]
    return t.size(DownScale(t.factor, t.trim, temporal=True).size(frames))


def settings(scales: tuple[AxisScale, ...], tile_size: int, overlap: int, temporal_size: int,
             temporal_overlap: int) -> EncodeSettings:
    """VAE.encode_tiled's conversion of VAE Encode (Tiled)'s inputs; raises InputError naming the
    input whose value ComfyUI's grid cannot walk (an overlap as wide as a tile)."""
    validate_settings(tile_size, overlap, temporal_size, temporal_overlap)
    smallest = tile_size // 2 if len(scales) == 2 else tile_size
    if tile_size and overlap >= smallest:
        what = "the narrow side of the t/2 x 2t grid" if len(scales) == 2 else "tile_size"
        raise InputError("overlap", f"{overlap} px must be smaller than {what} ({smallest} px) for this VAE")
    if len(scales) == 2:
        return EncodeSettings(tile_size, overlap)
    t = scales[0]
    down = DownScale(t.factor, t.trim, temporal=True)
    tile_t = max(2, down.size(temporal_size))
    overlap_t = max(1, min(tile_t // 2, down.size(temporal_overlap)))
    return EncodeSettings(tile_size, overlap, t.size(tile_t), t.size(overlap_t))


def plan_image(in_shape: tuple[int, ...], s: EncodeSettings, scales: tuple[AxisScale, ...],
               latent_channels: int) -> Plan:
    """Three grids per item, averaged, as ``VAE.encode_tiled_``."""
    if len(in_shape) != 4:
        raise ValueError(f"image encode plans take [B, C, H, W] pixels, got {in_shape}")
    t, o = s.tile, s.overlap
    down = down_scales(scales)
    tiles: list[Tile] = []
    for b in range(in_shape[0]):
        for p, hw in enumerate([(t, t), (t // 2, t * 2), (t * 2, t // 2)]):
            tiles += grid(b, tuple(in_shape[2:]), hw, (o, o), down, p, len(tiles), (True, True))
    return Plan(IMAGE, tuple(in_shape), out_shape_of(in_shape, latent_channels, down), down, 3, tuple(tiles),
                direction="encode")


def plan_video(in_shape: tuple[int, ...], s: EncodeSettings, scales: tuple[AxisScale, ...],
               latent_channels: int, causal: bool) -> Plan:
    """One 3-D grid per item as ``VAE.encode_tiled_3d``; causal VAEs: every frame in each tile."""
    if len(in_shape) != 5:
        raise ValueError(f"video encode plans take [B, C, T, H, W] pixels, got {in_shape}")
    frames = in_shape[2]
    down = down_scales(scales)
    if causal:
        tile, overlap, feather = (frames, s.tile, s.tile), (0, s.overlap, s.overlap), (False, True, True)
    else:
        tile, overlap, feather = (s.tile_t, s.tile, s.tile), (s.overlap_t, s.overlap, s.overlap), (True,) * 3
    tiles: list[Tile] = []
    for b in range(in_shape[0]):
        tiles += grid(b, tuple(in_shape[2:]), tile, overlap, down, 0, len(tiles), feather)
    return Plan(VIDEO, tuple(in_shape), out_shape_of(in_shape, latent_channels, down), down, 1, tuple(tiles),
                direction="encode")


def check_size(in_shape: tuple[int, ...], scales: tuple[AxisScale, ...]) -> None:
    """An input too small for one latent position is refused, naming ``pixels``."""
    down = down_scales(scales)
    for name, n, s in zip(("frames", "height", "width")[-len(down):], in_shape[2:], down):
        if s.canvas(n) < 1:
            raise InputError("pixels", f"the {name} ({n}) is smaller than one latent position of this VAE "
                                       f"({s.factor} {'frames' if s.temporal else 'px'})")


__all__ = ["EncodeSettings", "check_size", "down_scales", "frames_in", "plan_image", "plan_video", "settings"]
