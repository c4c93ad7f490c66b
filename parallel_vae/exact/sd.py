"""Exact banded decode for ComfyUI's 2-D ``Decoder`` (SD1.x/2.x, SDXL, SD3, Flux and other
16-channel variants), walked module by module without importing ComfyUI.

The prefix (``post_quant_conv``, ``conv_in``, the mid block with its global attention) runs on the
whole latent. A band then walks the up path on its own rows only, and exchanges with its
neighbours whatever crosses its edges:
- at every GroupNorm it yields the moments of its rows and waits for the global statistics
  (``stats.combine``);
- before every conv that reads beyond its output row it yields its edge rows of the conv's input
  and waits for its neighbours' (``"rows"``); the conv runs on [above; own; below] and keeps its
  own output rows.
Nothing is computed twice (no halo), and every conv sees the very inputs the untiled decode gives
it, so the output does not depend on the band count.
"""
from __future__ import annotations

from typing import Generator

import torch
import torch.nn.functional as F

from . import stats
from .attention import attention_block
from .geometry import conv_spread
from .lockstep import Request, RowsRequest, StatsRequest


class _Sync:
    """A band's place: own latent rows, the image height, and its sync points so far."""

    __slots__ = ("a", "e", "height", "k")

    def __init__(self, a: int, e: int, height: int):
        self.a, self.e, self.height, self.k = a, e, height, 0

    @property
    def alone(self) -> bool:  # the only band: no neighbours to exchange rows with
        return self.a == 0 and self.e == self.height

    def next(self) -> int:
        self.k += 1
        return self.k - 1


def _resblocks(decoder):
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for block in up.block:
            yield block
        if level != 0:
            yield up.upsample


class SdExact:
    """Bands of one SD-family ``first_stage_model``; ``sync`` says bands exchange GroupNorm moments
    and conv edge rows."""

    sync = "groupnorm"
    causal = False
    halo = 0  # a band reads no rows beyond its own: its neighbours send the edges each conv needs

    @staticmethod
    def halo_of(model) -> int:
        return SdExact.halo

    def __init__(self, model, dtype: torch.dtype, device, patch_size: int = 1, first_chunk: bool = False):
        # (patch_size and first_chunk: the executors' common signature; a 2-D decoder has neither)
        self.model = model
        self.decoder = model.decoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.px_per_row = 2 ** (self.decoder.num_resolutions - 1)

    @staticmethod
    def up_path(decoder) -> list:
        """The up path's layers in execution order (what a band runs)."""
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
        for layer in SdExact.up_path(dec):
            for m in layer.modules():
                if hasattr(m, "kernel_size") and not _same_rows(m):
                    return "its up path has a conv that is strided or not row-aligned"
        return None

    # -- prefix ----------------------------------------------------------------------------------
    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the mid block on the whole latent ``[1, C, H, W]``."""
        dec = self.decoder
        z = z.to(self.device, self.dtype)
        pqc = getattr(self.model, "post_quant_conv", None)
        if pqc is not None:
            z = pqc(z)
        h = dec.conv_in(z)
        h = dec.mid.block_1(h, None)
        h = attention_block(dec.mid.attn_1, h)  # ComfyUI's arithmetic, bounded memory
        return dec.mid.block_2(h, None)

    # -- one band --------------------------------------------------------------------------------
    def band(self, mid: torch.Tensor, a: int, e: int) -> Generator[Request, object, torch.Tensor]:
        """Own rows ``[a, e)``: yields a Request at each sync point and is sent back (mean, rstd) for
        a StatsRequest, (rows above or None, rows below or None) for a RowsRequest; returns the band's pixels
        ``[1, C, px*(e-a), W*px]`` on the device."""
        me = _Sync(a, e, mid.shape[-2])
        x = mid[:, :, a:e].contiguous()
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

    def _conv(self, me: _Sync, conv, box: list, name: str):
        """``conv`` on the tensor in ``box`` (taken out of it, so the caller holds no reference
        and it is freed once copied next to its neighbours' rows: one band-sized tensor less at
        the peak)."""
        x = box.pop()
        spread = conv_spread(conv)
        if spread == 0 or me.alone:
            return conv(x)
        rows = x.shape[-2]
        if rows < spread:
            raise RuntimeError(f"exact band [{me.a}, {me.e}) has {rows} rows before {name}, fewer than its conv reads")
        # clones: a view would keep this band's whole tensor alive in the neighbour's hands
        above, below = yield RowsRequest(me.next(), name, x[:, :, :spread].clone(), x[:, :, rows - spread:].clone())
        parts = [p for p in (above, x, below) if p is not None]
        if len(parts) == 1:
            return conv(x)
        joined = torch.cat(parts, -2)
        del parts, x
        y = conv(joined)
        del joined
        top = 0 if above is None else above.shape[-2]
        # contiguous again: on a view, elementwise kernels take their scalar tail path on other
        # elements than in a whole tensor (SiLU's exp differs there in the last bit), and the
        # output would depend on the band count
        return y[:, :, top:top + rows].contiguous()

    def _norm(self, me: _Sync, norm, x: torch.Tensor, name: str, inplace: bool = False):
        mean, rstd = yield StatsRequest(me.next(), name, norm.eps, stats.moments(x, norm.num_groups))
        return stats.normalize(x, norm, mean, rstd, inplace=inplace)

    def _resblock(self, me: _Sync, block, box: list):
        x = box.pop()
        h = yield from self._norm(me, block.norm1, x, "norm1")
        if block.in_channels != block.out_channels:
            # the 1x1 shortcut now, not at the end: the block's wide input (up[0]'s first block
            # takes 256 channels at full size) is not held through its sync points
            x = block.nin_shortcut(x)
        box, h = [F.silu(h, inplace=True)], None
        h = yield from self._conv(me, block.conv1, box, "conv1")
        h = yield from self._norm(me, block.norm2, h, "norm2", inplace=True)
        box, h = [F.silu(h, inplace=True)], None
        h = yield from self._conv(me, block.conv2, box, "conv2")
        return h.add_(x)


def _same_rows(conv) -> bool:
    """Output row i is centred on input row i: stride 1, padding equal to the spread."""
    stride = conv.stride[-2] if isinstance(conv.stride, (tuple, list)) else conv.stride
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "same"
    pad = pad[-2] if isinstance(pad, (tuple, list)) else pad
    return stride == 1 and pad == conv_spread(conv)
