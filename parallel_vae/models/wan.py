"""Wan 2.1 / 2.2 causal stepping: one latent frame per step, the conv cache carried per tile.

Mirrors ``WanVAE.decode`` (comfy/ldm/wan/vae.py, vae2_2.py): ``conv2`` over the whole latent,
then ``decoder`` on each frame with one shared ``feat_cache`` list, Wan 2.2 flagging its first
chunk and un-patchifying 2x2. The first step yields 1 frame, each later step 4.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from einops import rearrange

from .generic import GenericDecoder


def count_modules(module, class_name: str) -> int:
    return sum(type(m).__name__ == class_name for m in module.modules())


class WanStepper(GenericDecoder):
    can_step = True

    def __init__(self, module, dtype, device, output_device="cpu", patch_size: int = 1,
                 first_chunk: bool = False):
        super().__init__(module, dtype, device, output_device)
        self.patch_size = patch_size
        self.first_chunk = first_chunk
        self.cache_slots = count_modules(module.decoder, "CausalConv3d")

    @staticmethod
    def fits(module) -> bool:
        return all(hasattr(module, a) for a in ("decoder", "conv2")) and count_modules(module.decoder,
                                                                                       "CausalConv3d") > 0

    def steps(self, z: torch.Tensor, step_frames: Sequence[tuple[int, int]] = ()) -> Iterator[torch.Tensor]:
        m = self.module
        x = m.conv2(z.to(self.dtype).to(self.device))
        cache = [None] * self.cache_slots
        for i in range(x.shape[2]):
            extra = {"first_chunk": True} if self.first_chunk and i == 0 else {}
            out = m.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], **extra)
            if self.patch_size > 1:
                out = rearrange(out, "b (c r q) f h w -> b c f (h q) (w r)", q=self.patch_size, r=self.patch_size)
            yield self._out(out)
