"""Whole-tile decoding through the model's own ``decode``, as ComfyUI's tiled decode calls it."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


class GenericDecoder:
    can_step = False

    def __init__(self, module, dtype: torch.dtype, device, output_device="cpu", pixel_dtype=torch.float32):
        self.module = module
        self.dtype = dtype
        self.device = torch.device(device)
        self.output_device = torch.device(output_device)
        self.pixel_dtype = pixel_dtype

    def _out(self, pixels: torch.Tensor) -> torch.Tensor:
        # ComfyUI's decode_fn: decode, cast to its intermediate dtype on the device (float32 unless
        # --fp16-intermediates; 0.3.75 always float32), move to the output device. The blender works
        # in float32 like ComfyUI's canvas, so the rounded values are widened back without change.
        return pixels.to(self.pixel_dtype).to(self.output_device).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._out(self.module.decode(z.to(self.dtype).to(self.device)))

    def steps(self, z: torch.Tensor, step_frames: Sequence[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """Frames of each step; here by decoding the whole tile once and slicing it."""
        pixels = self.decode(z)
        for f0, f1 in step_frames:
            yield pixels[:, :, f0:f1]
