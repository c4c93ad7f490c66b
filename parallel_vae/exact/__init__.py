"""Exact mode: the untiled decode, computed in row bands on any number of devices.

``executor(family, module, ...)`` gives the family's band executor (sd.SdExact for ComfyUI's 2-D
``Decoder``, wan.WanExact for Wan 2.1 / 2.2), or raises Unsupported saying why. Executors are
duck-typed over ComfyUI's modules; this package never imports ComfyUI.
"""
from __future__ import annotations

import torch

from .sd import SdExact
from .wan import WanExact

SUPPORTED = ("SD 1.x/2.x, SDXL, SD3, Flux and other image VAEs built on ComfyUI's 2-D Decoder",
             "Wan 2.1 (also Qwen-Image)", "Wan 2.2")


class Unsupported(Exception):
    """This VAE has no exact executor; the message says why."""


def executor(family: str, model, dtype: torch.dtype, device, patch_size: int = 2):
    if family == "image":
        why = SdExact.refusal(model)
        if why is None:
            return SdExact(model, dtype, device)
    elif family in ("wan21", "wan22"):
        why = WanExact.refusal(model)
        if why is None:
            if family == "wan22":
                return WanExact(model, dtype, device, patch_size=patch_size, first_chunk=True)
            return WanExact(model, dtype, device)
    else:
        why = "exact mode has no executor for this family"
    raise Unsupported(why)


def refusal(family: str, model) -> str | None:
    """Why ``model`` cannot decode in exact mode (None: it can), without building anything."""
    if family == "image":
        return SdExact.refusal(model)
    if family in ("wan21", "wan22"):
        return WanExact.refusal(model)
    return "exact mode has no executor for this family"


__all__ = ["SUPPORTED", "SdExact", "Unsupported", "WanExact", "executor", "plan", "refusal"]


def plan(family: str, model, latent_shape, scales, out_channels: int, tile_size: int, lanes):
    """The exact plan, with the halo the decoder's layers need (none where bands exchange their
    conv edges). ``lanes`` is a lane count, or one shares.LaneShare per worker device.

    Bands in lock-step (SD family) with LaneShares: each device decodes rows in proportion to its
    speed within its memory (shares.split), and the plan says which bands are whose. Otherwise the
    bands are even and sized by ``tile_size`` (a band's own rows hold at most tile_size^2 output
    pixels); Wan's bands are independent units, pulled by whichever device is free."""
    from .geometry import band_count, halo_rows, plan_exact, split_rows
    from .shares import split

    halo = SdExact.halo if family == "image" else halo_rows(WanExact.rf_rows(model.decoder))
    height, width = latent_shape[-2], latent_shape[-1]
    if family == "image" and not isinstance(lanes, int):
        shared = split(height, lanes)
        return plan_exact(latent_shape, scales, out_channels, shared.spans, halo,
                          tuple((name, len(bands)) for name, bands in shared.lanes))
    count = lanes if isinstance(lanes, int) else len(lanes)
    bands = band_count(height, width, scales[-1].factor, tile_size, count, halo)
    return plan_exact(latent_shape, scales, out_channels, split_rows(height, bands), halo)
