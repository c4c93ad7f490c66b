"""What a row band of ComfyUI's 2-D VAE blocks does at each layer, exchanging with its neighbour
bands whatever crosses its edges (the decoder's up path, sd.py, and the encoder's down path,
sd_encode.py):
- at every GroupNorm it yields the moments of its rows and waits for the global statistics
  (``stats.combine``);
- before every conv that reads beyond its output row it yields its edge rows of the conv's input
  and waits for its neighbours' (``"rows"``); the conv runs without row padding on [above; own;
  below] (zero rows at the image's edge), which gives exactly its own output rows;
- at the mid block's global attention it yields its keys and values and gets every band's back
  (``GatherRequest``); it attends with its own queries only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import stats
from .attention import band_attention
from .geometry import conv_spread, edge_rows, join_rows, row_part, rows_unpadded
from .lockstep import GatherRequest, RowsRequest, StatsRequest


class Sync:
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


class RowOps:
    """Band steps shared by the 2-D executors; ``me`` is the band's Sync. ``fmt`` is the memory
    layout every band tensor is kept in (the same in every band and process: kernels may round
    differently on another layout, and neighbours' rows arrive from the wire in any layout)."""

    fmt = torch.contiguous_format

    def dense(self, t: torch.Tensor) -> torch.Tensor:
        """A fresh copy of ``t`` in ``fmt``. Never a view: on a view, elementwise kernels take their
        scalar tail path on other elements than in a whole tensor (SiLU's exp differs there in
        the last bit), and the output would depend on the band count."""
        return t.clone(memory_format=self.fmt)

    def _conv(self, me: Sync, conv, box: list, name: str):
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
        if above is None and below is None:
            return conv(x)
        # [above; own; below] with no row padding: exactly the band's own output rows, no copy after
        joined = join_rows([edge_rows(x, above, spread), x, edge_rows(x, below, spread)], self.fmt)
        del x, above, below
        with rows_unpadded(conv):
            return conv(joined)

    def _stats(self, me: Sync, norm, x: torch.Tensor, name: str):
        """The global (mean, rstd) of GroupNorm ``norm`` over every band's ``x``."""
        return (yield StatsRequest(me.next(), name, norm.eps, stats.moments(x, norm.num_groups)))

    def _norm(self, me: Sync, norm, x: torch.Tensor, name: str, inplace: bool = False):
        mean, rstd = yield from self._stats(me, norm, x, name)
        return stats.normalize(x, norm, mean, rstd, inplace=inplace)

    def _resblock(self, me: Sync, block, box: list):
        x = box.pop()
        if block.in_channels != block.out_channels:
            # the 1x1 shortcut before norm1, which then normalises the block's wide input in place
            # (up[0]'s first block takes 256 channels at full size): one wide tensor alive, not two,
            # and none held through the block's later sync points
            mean, rstd = yield from self._stats(me, block.norm1, x, "norm1")
            h = x
            x = block.nin_shortcut(h)
            h = stats.normalize(h, block.norm1, mean, rstd, inplace=True)
        else:
            h = yield from self._norm(me, block.norm1, x, "norm1")  # x stays for the residual
        box, h = [F.silu(h, inplace=True)], None
        h = yield from self._conv(me, block.conv1, box, "conv1")
        h = yield from self._norm(me, block.norm2, h, "norm2", inplace=True)
        box, h = [F.silu(h, inplace=True)], None
        h = yield from self._conv(me, block.conv2, box, "conv2")
        return h.add_(x)

    def _attention(self, me: Sync, attn, x: torch.Tensor):
        """``attn(x)`` (ComfyUI's AttnBlock) for this band's queries against every band's keys and
        values, gathered in row order: the only whole-item tensor a band holds."""
        h = yield from self._norm(me, attn.norm, x, "attn.norm")
        q, k, v = attn.q(h), attn.k(h), attn.v(h)
        del h
        if not me.alone:
            channels = k.shape[1]
            kv = yield GatherRequest(me.next(), "attn", torch.cat([k, v], 1))
            k, v = kv[:, :channels], kv[:, channels:]
        out = self.dense(band_attention(attn, q, k, v))
        del q, k, v
        return x + attn.proj_out(out)


def same_rows(conv) -> bool:
    """Output row i is centred on input row i: stride 1, padding equal to the spread."""
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "same"
    return row_part(conv.stride) == 1 and row_part(pad) == conv_spread(conv)
