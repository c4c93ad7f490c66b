"""Whole-tile decoding through the model's own ``decode``, as ComfyUI's tiled decode calls it."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


class GenericDecoder:
    can_step = False

    def __init__(self, module, dtype: torch.dtype, device, output_device="cpu"):
        self.module = module
        self.dtype = dtype
        self.device = torch.device(device)
        self.output_device = torch.device(output_device)

    def _out(self, pixels: torch.Tensor) -> torch.Tensor:
        # ComfyUI's decode_fn: decode, .float() on the device, then move to the output device.
        return pixels.float().to(self.output_device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._out(self.module.decode(z.to(self.dtype).to(self.device)))

    def steps(self, z: torch.Tensor, step_frames: Sequence[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """Frames of each step; here by decoding the whole tile once and slicing it."""
        pixels = self.decode(z)
        for f0, f1 in step_frames:
            yield pixels[:, :, f0:f1]
