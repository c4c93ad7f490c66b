"""Exact mode: the untiled decode, computed in row bands on any number of lanes.

The band executors (sd.SdExact for ComfyUI's 2-D ``Decoder``, wan.WanExact for Wan 2.1 / 2.2)
are duck-typed over ComfyUI's modules; this package never imports ComfyUI. Which family has which
executor is families.py's table. ``plan`` makes the bands: by the lanes' terms (shares.py) where
bands run in lock-step across lanes, else evenly.
"""
from __future__ import annotations

from typing import Sequence

from .geometry import band_count, plan_exact, plan_exact_encode, split_rows
from .sd import SdExact
from .shares import Terms, split
from .wan import WanExact


class Unsupported(Exception):
    """This VAE has no exact executor; the message says why."""


def plan(in_shape, scales, out_channels: int, tile_size: int, terms: Sequence[Terms] = ()):
    """The exact plan. With the lanes' ``terms`` (one per lane decoding at once, in lock-step):
    each lane decodes rows in proportion to its speed within its memory (shares.split), and the
    plan says which bands are whose. Otherwise (no terms: one lane decodes every band in turn) the
    bands are even and sized by ``tile_size`` (a band's own rows hold at most tile_size^2 output
    pixels)."""
    height, width = in_shape[-2], in_shape[-1]
    if terms:
        shared = split(height, terms)
        return plan_exact(in_shape, scales, out_channels, shared.spans, shared.shares)
    bands = band_count(height, width, scales[-1].factor, tile_size)
    return plan_exact(in_shape, scales, out_channels, split_rows(height, bands))


def plan_encode(in_shape, scales, latent_channels: int, tile_size: int, terms: Sequence[Terms] = ()):
    """Exact encoding's plan, banded as ``plan`` bands a decode: ``in_shape`` are the pixels, the
    bands are rows of the latent they encode to."""
    f = scales[-2].factor
    height, width = -(-in_shape[-2] // f), -(-in_shape[-1] // f)
    if terms:
        shared = split(height, terms)
        return plan_exact_encode(in_shape, scales, latent_channels, shared.spans, shared.shares)
    bands = band_count(height, width, f, tile_size)
    return plan_exact_encode(in_shape, scales, latent_channels, split_rows(height, bands))


__all__ = ["SdExact", "Terms", "Unsupported", "WanExact", "plan", "plan_encode"]
