"""One encode as the nodes run it: the pixels checked and prepared as ComfyUI's VAE Encode prepares
them, then planned and started like a decode (job.Job): the same backends, lanes and units."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel_vae import exact, plan_encode, sizing
from ..parallel_vae import devices as device_lists
from ..parallel_vae.errors import InputError
from ..parallel_vae.inputs import check_values
from ..parallel_vae.plan import Plan
from ..parallel_vae.spec import VaeSpec
from . import compat, vae_info
from .job import Job, check_mode, exact_wanted
from .sharding import check_sharding


def prepare_pixels(vae, spec: VaeSpec, pixels) -> torch.Tensor:
    """IMAGE ``[B, H, W, C]`` as the VAE's encoder takes it: ``[B, C, H, W]`` (image VAEs) or the
    batch as frames ``[1, C, T, H, W]`` (video VAEs), cropped and through ``process_input`` as VAE
    Encode does, in float32 on the CPU. Raises InputError naming ``pixels``."""
    if not isinstance(pixels, torch.Tensor):
        raise InputError("pixels", f"expected an IMAGE tensor [B, H, W, C], got {type(pixels).__name__}")
    if pixels.ndim != 4:
        raise InputError("pixels", f"expected an IMAGE [B, H, W, C], got a {pixels.ndim}-D tensor of shape "
                                   f"{list(pixels.shape)}")
    check_values(pixels, "pixels", "encode", "IMAGE", "an upstream node produced an invalid image")
    factor = spec.spatial_compression
    if min(pixels.shape[1], pixels.shape[2]) < factor:
        raise InputError("pixels", f"{pixels.shape[2]}x{pixels.shape[1]} px is smaller than one latent pixel of "
                                   f"the {spec.label} ({factor}x{factor} px)")
    x = compat.encode_crop(vae, pixels)
    if x.shape[-1] != spec.out_channels:
        raise InputError("pixels", f"has {pixels.shape[-1]} channels; the {spec.label} encodes "
                                   f"{spec.out_channels}-channel images")
    x = x.movedim(-1, 1)
    if spec.latent_dim == 3:
        x = x.unsqueeze(2) if getattr(vae, "not_video", False) else x.movedim(1, 0).unsqueeze(0)
        x = x[:, :, :plan_encode.frames_in(spec.scales, x.shape[2])]
    plan_encode.check_size(tuple(x.shape), spec.scales)
    return vae.process_input(x.to("cpu", torch.float32))


@dataclass
class EncodeJob(Job):
    """An encode: ``tensor`` is the prepared pixels (prepare_pixels)."""

    direction = "encode"

    @classmethod
    def prepare(cls, pixels, vae, tile_size, overlap, temporal_size, temporal_overlap, devices, node_id,
                mode="auto", sharding=None) -> "EncodeJob":
        mode = check_mode(mode)
        spec = vae_info.describe(vae, "encode")
        named = device_lists.parse(devices)
        plan_encode.settings(spec.scales, tile_size, overlap, temporal_size, temporal_overlap)
        x = prepare_pixels(vae, spec, pixels)
        pinned = check_sharding(sharding)
        return cls(vae, spec, x, named, tile_size, overlap, temporal_size, temporal_overlap,
                   exact_wanted(mode, spec, vae, "encode"), node_id, pinned)

    def cost(self) -> sizing.Cost:
        return vae_info.encode_cost(self.vae, self.spec)

    def tiled_plan(self, tile_size: int, overlap: int) -> Plan:
        spec, shape = self.spec, tuple(self.tensor.shape)
        s = plan_encode.settings(spec.scales, tile_size, overlap, self.temporal_size, self.temporal_overlap)
        if spec.latent_dim == 2:
            return plan_encode.plan_image(shape, s, spec.scales, spec.latent_channels)
        return plan_encode.plan_video(shape, s, spec.scales, spec.latent_channels, spec.causal)

    def exact_plan(self, tile_size: int, terms) -> Plan:
        spec = self.spec
        return exact.plan_encode(tuple(self.tensor.shape), spec.scales, spec.latent_channels, tile_size, terms)

    def result(self, blended: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The LATENT's samples as core's VAE Encode returns them (its dtype: ComfyUI's intermediate one)."""
        return blended.to(compat.pixel_dtype())


__all__ = ["EncodeJob", "prepare_pixels"]
