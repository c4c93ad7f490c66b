"""Exact banded decode for ComfyUI's 2-D ``Decoder`` (SD1.x/2.x, SDXL, SD3, Flux and other
16-channel variants), walked module by module without importing ComfyUI.

A band owns latent rows ``[a, e)`` and walks the whole decoder on them (``post_quant_conv``,
``conv_in``, the mid block, the up path), exchanging with its neighbours whatever crosses its
edges (row_ops.py):
- at every GroupNorm it yields the moments of its rows and waits for the global statistics
  (``stats.combine``);
- before every conv that reads beyond its output row it yields its edge rows of the conv's input
  and waits for its neighbours' (``"rows"``); the conv runs on [above; own; below] and keeps its
  own output rows;
- at the mid block's global attention it yields its keys and values and attends with its own
  queries over every band's.
Every row is computed once, on one lane (no halo, no prefix repeated per lane), and every conv
sees the very inputs the untiled decode gives it, so the output does not depend on the band count.
"""
from __future__ import annotations

from typing import Generator

import torch
import torch.nn.functional as F

from .attention import is_attn_block
from .lockstep import Request
from .row_ops import RowOps, Sync, same_rows


def _resblocks(decoder):
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for block in up.block:
            yield block
        if level != 0:
            yield up.upsample


class SdExact(RowOps):
    """Bands of one SD-family ``first_stage_model``: they exchange GroupNorm moments, conv edge rows
    and the mid-block attention's keys and values."""

    # Bands are channels-last, as the encoder's, though VAE Decode's latent is not: oneDNN convolves
    # channels-last input without reordering it (about 10% of a 512x512 SD decode on a CPU at one
    # and at two threads); every band is in the same layout, so band counts still agree bit for bit
    fmt = torch.channels_last
    # in a worker, large blocks come from the heap during the decode (heap.Heap.reusing_blocks)
    reuse_blocks = True

    def __init__(self, model, dtype: torch.dtype, device, patch_size: int = 1, first_chunk: bool = False):
        # (patch_size and first_chunk: the executors' common signature; a 2-D decoder has neither)
        self.model = model
        self.decoder = model.decoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.px_per_row = 2 ** (self.decoder.num_resolutions - 1)

    @staticmethod
    def up_path(decoder) -> list:
        """The up path's layers in execution order (what a band runs after the mid block)."""
        return [*_resblocks(decoder), decoder.norm_out, decoder.conv_out]

    @staticmethod
    def refusal(model) -> str | None:
        """Why this model has no exact executor (None: it has one)."""
        dec = getattr(model, "decoder", None)
        if dec is None or type(dec).__name__ != "Decoder":
            return "its decoder is not ComfyUI's 2-D Decoder"
        if getattr(dec, "carried", False) or getattr(model, "bn", None) is not None:
            return "its decoder is a 3-D or patched variant"
        if getattr(dec, "temb_ch", 0):
            return "its decoder takes a timestep embedding"
        for level in dec.up:
            if len(level.attn):
                return "its up path has attention layers"
            for block in level.block:
                if getattr(block, "use_conv_shortcut", False) and block.in_channels != block.out_channels:
                    return "its up path has 3x3 shortcut convs"
        up = getattr(dec.up[-1], "upsample", None)
        if up is not None and (not getattr(up, "with_conv", True) or getattr(up, "scale_factor", 2.0) not in (2, 2.0)):
            return "its upsampling is not a nearest x2 followed by a conv"
        attn = getattr(getattr(dec, "mid", None), "attn_1", None)
        if attn is None or not is_attn_block(attn):
            return "its mid block has no ComfyUI AttnBlock"
        pqc = getattr(model, "post_quant_conv", None)
        if pqc is not None and tuple(getattr(pqc, "kernel_size", (1, 1))) not in ((1, 1), (1,)):
            return "its post_quant_conv reads beyond its own rows"
        for layer in [dec.conv_in, dec.mid.block_1, dec.mid.block_2, *SdExact.up_path(dec)]:
            for m in layer.modules():
                if hasattr(m, "kernel_size") and not same_rows(m):
                    return "its up path has a conv that is strided or not row-aligned"
        return None

    # -- the whole item (the input every band reads its rows of) ---------------------------------
    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """Nothing runs on the whole latent: ``z`` on the device, in the model's dtype."""
        return z.to(self.device, self.dtype)

    # -- one band --------------------------------------------------------------------------------
    def band(self, z: torch.Tensor, a: int, e: int) -> Generator[Request, object, torch.Tensor]:
        """Own rows ``[a, e)`` of the latent ``z`` ``[1, C, H, W]`` (on the device): yields a Request
        at each sync point and is sent back (mean, rstd) for a StatsRequest, (rows above or None,
        rows below or None) for a RowsRequest, the whole item's rows for a GatherRequest; returns
        the band's pixels ``[1, C, px*(e-a), W*px]`` on the device."""
        me = Sync(a, e, z.shape[-2])
        dec = self.decoder
        x = self.dense(z[:, :, a:e])
        pqc = getattr(self.model, "post_quant_conv", None)
        if pqc is not None:
            x = pqc(x)  # 1x1: its own rows only
        box, x = [x], None
        h = yield from self._conv(me, dec.conv_in, box, "conv_in")
        box, h = [h], None
        h = yield from self._resblock(me, dec.mid.block_1, box)
        h = yield from self._attention(me, dec.mid.attn_1, h)
        box, h = [h], None
        h = yield from self._resblock(me, dec.mid.block_2, box)
        return (yield from self._up(me, h))

    def _up(self, me: Sync, x: torch.Tensor) -> Generator[Request, object, torch.Tensor]:
        for layer in _resblocks(self.decoder):
            if not hasattr(layer, "norm1"):  # an Upsample: nearest x2, then its conv
                box, x = [F.interpolate(x, scale_factor=2.0, mode="nearest")], None
                x = yield from self._conv(me, layer.conv, box, "upsample")
            else:
                box, x = [x], None  # the block holds its input alone (it may drop it early)
                x = yield from self._resblock(me, layer, box)
        x = yield from self._norm(me, self.decoder.norm_out, x, "norm_out", inplace=True)
        box, x = [F.silu(x, inplace=True)], None
        x = yield from self._conv(me, self.decoder.conv_out, box, "conv_out")
        if getattr(self.decoder, "tanh_out", False):
            x = torch.tanh(x)
        return x
