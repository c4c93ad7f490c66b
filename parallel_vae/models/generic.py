"""Whole-tile decoding and encoding through the model's own ``decode`` and ``encode``, as ComfyUI's
tiled decode and encode call them."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


class GenericDecoder:
    """``decode(z)`` of a whole tile; ``steps`` slices it. Causal steppers (wan.py, taehv.py)
    subclass it; ``patch_size`` and ``first_chunk`` are the family's (families.py), used by the
    steppers that need them."""

    def __init__(self, module, dtype: torch.dtype, device, output_device="cpu", pixel_dtype=torch.float32,
                 patch_size: int = 1, first_chunk: bool = False):
        self.module = module
        self.dtype = dtype
        self.device = torch.device(device)
        self.output_device = torch.device(output_device)
        self.pixel_dtype = pixel_dtype
        self.patch_size = patch_size
        self.first_chunk = first_chunk

    def output(self, pixels: torch.Tensor) -> torch.Tensor:
        """Decoded pixels as ComfyUI's decode_fn hands them on: cast to its intermediate dtype on the
        device (float32 unless --fp16-intermediates; 0.3.75 always float32), moved to the output
        device. The blender works in float32 like ComfyUI's canvas, so the rounded values are widened
        back without change."""
        return pixels.to(self.pixel_dtype).to(self.output_device).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.output(self.module.decode(z.to(self.dtype).to(self.device)))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """A tile's latent as VAE Encode (Tiled)'s encode_fn gives it: ``pixels`` have been through
        the VAE's process_input already (elementwise, so the whole input is done at once)."""
        return self.output(self.module.encode(pixels.to(self.dtype).to(self.device)))

    def steps(self, z: torch.Tensor, step_frames: Sequence[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """Frames of each step; here by decoding the whole tile once and slicing it."""
        pixels = self.decode(z)
        for f0, f1 in step_frames:
            yield pixels[:, :, f0:f1]
