"""Exchange points on ComfyUI's Wan decoder modules, for bands that run the decoder itself on their
own rows in a thread each (threads.py, wan.py).

Two kinds of layer read beyond a band's rows:
- a conv whose kernel spreads over rows (3x3 and 3x3x3): at its ``_conv_forward`` (after a
  CausalConv3d has put its cached frames and this call's together, so the rows a neighbour sends
  include its cached frames) the band sends its edge rows and gets its neighbours', runs the conv
  on [above; own; below] and keeps its own output rows;
- the middle block's per-frame attention: the band sends its keys and values and attends with its
  own queries over every band's (attention.attend_band).
Wan's norms work per pixel, so nothing else crosses a band's edge.

The hooks are instance attributes, put on while bands run (``exchanging``) and taken off after;
outside a band's thread (``threads.current()`` is None) they call the module's own code.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from .attention import attend_band
from .geometry import conv_spread, named
from .lockstep import GatherRequest, RowsRequest
from .threads import current

_lock = threading.Lock()
_users: dict[int, int] = {}  # id(decoder) -> bands running on it


def spreading_convs(decoder) -> list:
    return [m for m in decoder.modules() if hasattr(m, "_conv_forward") and hasattr(m, "kernel_size")
            and conv_spread(m) > 0]


def _pad_rows(conv) -> int:
    pad = conv.padding
    return pad[-2] if isinstance(pad, (tuple, list)) else pad


def refusal(decoder) -> str | None:
    """Why these hooks cannot band ``decoder`` (None: they can)."""
    for m in spreading_convs(decoder):
        stride = m.stride[-2] if isinstance(m.stride, (tuple, list)) else m.stride
        pad = _pad_rows(m)
        if stride != 1 or isinstance(pad, str) or pad > conv_spread(m):
            return "its decoder has a conv that is strided or not row-aligned"
    for m in decoder.modules():
        if named(m, "AttentionBlock") and not callable(getattr(m, "optimized_attention", None)):
            return "its attention is not ComfyUI's"
    return None


def _conv_hook(conv, name: str):
    original = conv._conv_forward
    spread = conv_spread(conv)
    pre = spread - _pad_rows(conv)  # rows of zeros the module put on the input before the conv (ComfyUI 0.3.x)

    def _conv_forward(input, weight, bias, *args, **kwargs):
        me = current()
        if me is None or me.alone:
            return original(input, weight, bias, *args, **kwargs)
        height = input.shape[-2]
        own = input.narrow(-2, pre, height - 2 * pre)
        rows = own.shape[-2]
        if rows < spread:
            raise RuntimeError(f"exact band [{me.a}, {me.e}) has {rows} rows before {name}, fewer than its conv reads")
        # clones: a view would keep this band's whole input alive in the neighbour's hands
        above, below = me.ask(RowsRequest(me.next(), name, own.narrow(-2, 0, spread).clone(),
                                          own.narrow(-2, rows - spread, spread).clone()))
        top = input.narrow(-2, 0, pre) if above is None else above
        bottom = input.narrow(-2, height - pre, pre) if below is None else below
        joined = torch.cat([top, own, bottom], -2)
        del own, above, below, input
        y = original(joined, weight, bias, *args, **kwargs)
        del joined
        # a fresh tensor, not a view: elementwise kernels round a view's tail differently
        return y.narrow(-2, top.shape[-2] - pre, rows).clone(memory_format=torch.contiguous_format)

    return _conv_forward


def _attention_hook(block):
    original = block.optimized_attention

    def optimized_attention(q, k, v):
        me = current()
        if me is None:
            return original(q, k, v)
        if not me.alone:
            channels = k.shape[1]
            kv = me.ask(GatherRequest(me.next(), "attn", torch.cat([k, v], 1)))
            k, v = kv[:, :channels], kv[:, channels:]
        return attend_band(original, q, k, v)

    optimized_attention.__wrapped__ = original
    return optimized_attention


def _install(decoder) -> None:
    for i, conv in enumerate(spreading_convs(decoder)):
        conv._conv_forward = _conv_hook(conv, f"conv{i}")
    for block in decoder.modules():
        if named(block, "AttentionBlock"):
            block.optimized_attention = _attention_hook(block)


def _remove(decoder) -> None:
    for conv in spreading_convs(decoder):
        conv.__dict__.pop("_conv_forward", None)
    for block in decoder.modules():
        if named(block, "AttentionBlock"):
            block.optimized_attention = getattr(block.optimized_attention, "__wrapped__", block.optimized_attention)


@contextmanager
def exchanging(decoder):
    """The hooks on ``decoder`` while the calling band runs (counted: the last band takes them off)."""
    with _lock:
        n = _users.get(id(decoder), 0)
        if n == 0:
            _install(decoder)
        _users[id(decoder)] = n + 1
    try:
        yield
    finally:
        with _lock:
            n = _users[id(decoder)] - 1
            if n == 0:
                _remove(decoder)
                del _users[id(decoder)]
            else:
                _users[id(decoder)] = n


__all__ = ["exchanging", "refusal", "spreading_convs"]
