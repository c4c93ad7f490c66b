"""Wan 2.1 / 2.2 causal stepping: the conv cache carried per tile, pixels yielded per latent frame.

Mirrors ``WanVAE.decode`` (comfy/ldm/wan/vae.py, vae2_2.py): ``conv2`` over the whole latent, then
``decoder`` on successive chunks of latent frames with one shared ``feat_cache`` list, Wan 2.2
flagging its first chunk and un-patchifying. The chunking follows the decoder itself:

- decoders that return a tensor (Wan 2.1 up to ComfyUI 0.17, Wan 2.2) take one latent frame a step;
- decoders that return a list of chunks (Wan 2.1 from ComfyUI 0.18) keep a cache made for two
  latent frames at a time: the first latent frame alone, then pairs (the last may be single).
  Feeding them single frames gives wrong pixels.

Either way each latent frame's pixels are yielded as soon as they exist (a pair yields two steps:
1 frame for the first latent frame, 4 for each later one). ``models.check`` verifies the result
against the module's own ``decode`` before the stepper is trusted.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from einops import rearrange

from .generic import GenericDecoder


def unpatchify(out: torch.Tensor, patch: int) -> torch.Tensor:
    """Wan 2.2's head emits patch x patch pixels per position as channels."""
    return rearrange(out, "b (c r q) f h w -> b c f (h q) (w r)", q=patch, r=patch)


def count_modules(module, class_name: str) -> int:
    return sum(type(m).__name__ == class_name for m in module.modules())


class WanStepper(GenericDecoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_slots = count_modules(self.module.decoder, "CausalConv3d")

    @staticmethod
    def fits(module) -> bool:
        return all(hasattr(module, a) for a in ("decoder", "conv2")) and count_modules(module.decoder,
                                                                                       "CausalConv3d") > 0

    def steps(self, z: torch.Tensor, step_frames: Sequence[tuple[int, int]] = ()) -> Iterator[torch.Tensor]:
        m = self.module
        x = m.conv2(z.to(self.dtype).to(self.device))
        frames = x.shape[2]
        cache = [None] * self.cache_slots
        pairs = False  # set once the decoder shows it returns chunks (and so expects pairs)
        i = 0
        while i < frames:
            n = min(2 if pairs else 1, frames - i)
            extra = {"first_chunk": True} if self.first_chunk and i == 0 else {}
            out = m.decoder(x[:, :, i:i + n], feat_cache=cache, feat_idx=[0], **extra)
            if isinstance(out, (list, tuple)):
                pairs = True
                out = torch.cat(list(out), 2)
            if self.patch_size > 1:
                out = unpatchify(out, self.patch_size)
            for part in out.chunk(n, 2):  # a pair's 8 frames are 4 per latent frame
                yield self.output(part)
            i += n
