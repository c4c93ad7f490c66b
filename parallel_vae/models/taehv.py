"""TAEHV (tiny video VAE) causal stepping: one latent frame per step through the MemBlocks.

Mirrors the sequential branch of ``apply_model_with_memblocks`` (comfy/taesd/taehv.py): each
input frame runs depth-first through the decoder, MemBlocks see the previous frame's input at
their depth, TGrow splits a frame into ``stride`` frames in order, and the first
``frames_to_trim`` output frames are dropped. So the first step yields 1 frame, later steps 4.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .generic import GenericDecoder


class TaehvStepper(GenericDecoder):
    @staticmethod
    def fits(module) -> bool:
        needed = ("decoder", "frames_to_trim", "patch_size", "process_in")
        return all(hasattr(module, a) for a in needed) and not getattr(module, "parallel", False)

    def _frame(self, xt: torch.Tensor, memory: list) -> list[torch.Tensor]:
        blocks = self.module.decoder
        batch = xt.shape[0]
        queue = deque([(xt, 0)])
        out = []
        while queue:
            xt, i = queue.popleft()
            if i == len(blocks):
                out.append(xt)
                continue
            block = blocks[i]
            kind = type(block).__name__
            if kind == "MemBlock":
                new = block(xt, xt * 0 if memory[i] is None else memory[i])
                memory[i] = xt.detach().clone()
                queue.appendleft((new, i + 1))
            elif kind == "TGrow":
                grown = block(xt)
                _, c, h, w = grown.shape
                for part in reversed(grown.view(batch, block.stride * c, h, w).chunk(block.stride, 1)):
                    queue.appendleft((part, i + 1))
            elif kind == "TPool":
                raise NotImplementedError("TPool only appears in TAEHV encoders")
            else:
                queue.appendleft((block(xt), i + 1))
        return out

    def steps(self, z: torch.Tensor, step_frames: Sequence[tuple[int, int]] = ()) -> Iterator[torch.Tensor]:
        m = self.module
        x = m.process_in(z.to(self.dtype).to(self.device)).movedim(2, 1)  # [B, T, C, H, W]
        memory = [None] * len(m.decoder)
        trim = m.frames_to_trim
        for t in range(x.shape[1]):
            frames = torch.stack(self._frame(x[:, t], memory), 1)
            if m.patch_size > 1:
                frames = F.pixel_shuffle(frames, m.patch_size)
            drop = min(trim, frames.shape[1])
            trim -= drop
            yield self.output(frames[:, drop:].movedim(2, 1))
