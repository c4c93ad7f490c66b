"""Exchange points on ComfyUI's Wan decoder and encoder modules, for bands that run the decoder or
encoder itself on their own rows in a thread each (threads.py, wan.py, wan_encode.py).

Three kinds of layer read beyond a band's rows:
- a conv whose kernel spreads over rows (3x3 and 3x3x3): at its ``_conv_forward`` (after a
  CausalConv3d has put its cached frames and this call's together, so the rows a neighbour sends
  include its cached frames) the band sends its edge rows and gets its neighbours' and convolves
  [above; own; below] without row padding, which gives exactly its own output rows (no row is
  computed twice or copied after);
- the encoder's downsampling conv (3x3, stride 2, after a ZeroPad2d that adds one zero row at the
  bottom): a band's last output row reads the first row of the band below, which takes the pad
  row's place (bands are aligned so every band above the last has an even number of rows);
- the middle block's per-frame attention: the band sends its keys and values and attends with its
  own queries over every band's (attention.attend_band).
Wan's norms work per pixel, so nothing else crosses a band's edge.

The hooks are instance attributes, put on while bands run (``exchanging``) and taken off after;
outside a band's thread (``threads.current()`` is None) they call the module's own code.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import torch

from .attention import attend_band
from .geometry import conv_spread, edge_rows, is_conv, join_rows, named, row_part, rows_unpadded, upsample_factor
from .lockstep import GatherRequest, RowsRequest
from .threads import current

_lock = threading.Lock()
_users: dict[int, int] = {}  # id(module) -> bands running on it


def spreading_convs(part) -> list:
    return [m for m in part.modules() if hasattr(m, "_conv_forward") and hasattr(m, "kernel_size")
            and conv_spread(m) > 0]


def _padded_downsamples(part) -> set[int]:
    """ids of the 3x3 stride-2 convs that follow a ZeroPad2d of one row at the bottom and one column
    at the right (Wan's Resample "downsample2d"/"downsample3d")."""
    found = set()
    for m in part.modules():
        children = list(m.children())
        for before, conv in zip(children, children[1:]):
            if not (named(before, "ZeroPad2d") and tuple(before.padding) == (0, 1, 0, 1)
                    and hasattr(conv, "kernel_size")):
                continue
            if (row_part(conv.kernel_size), row_part(conv.stride), row_part(conv.padding),
                    row_part(getattr(conv, "dilation", 1))) == (3, 2, 0, 1):
                found.add(id(conv))
    return found


def _upsampling_convs(part) -> dict[int, object]:
    """id(conv) -> the Sequential for each ``Sequential(Upsample(x2 nearest), 3x3 conv, stride 1,
    padding 1)`` (Wan's Resample "upsample2d"/"upsample3d")."""
    found = {}
    for m in part.modules():
        children = list(m.children())
        if len(children) == 2 and upsample_factor(children[0]) == 2 \
                and getattr(children[0], "mode", None) in ("nearest", "nearest-exact") and is_conv(children[1]) \
                and (row_part(children[1].kernel_size), row_part(children[1].stride),
                     row_part(children[1].padding), conv_spread(children[1])) == (3, 1, 1, 1):
            found[id(children[1])] = m
    return found


def refusal(part, what: str = "decoder") -> str | None:
    """Why these hooks cannot band ``part`` (a Wan decoder or encoder; None: they can)."""
    down = _padded_downsamples(part)
    for m in spreading_convs(part):
        pad = row_part(m.padding)
        if id(m) in down:
            continue
        if row_part(m.stride) != 1 or isinstance(pad, str) or pad > conv_spread(m):
            return f"its {what} has a conv that is strided or not row-aligned"
    for m in part.modules():
        if named(m, "AttentionBlock") and not callable(getattr(m, "optimized_attention", None)):
            return "its attention is not ComfyUI's"
    return None


def _on_onednn(conv, input, args, kwargs) -> bool:
    """Whether ``_convolve`` takes oneDNN's kernel for this call (float32 on the CPU, a plain conv)."""
    return input.device.type == "cpu" and input.dtype == torch.float32 and not args \
        and not set(kwargs) - {"autopad"} and kwargs.get("autopad") in (None, "causal_zero") \
        and getattr(conv, "padding_mode", "zeros") == "zeros" and not getattr(conv, "transposed", False) \
        and not isinstance(conv.padding, str) and torch.backends.mkldnn.is_available()


def _convolve(conv, original, input, weight, bias, args, kwargs):
    """A band's conv call, on oneDNN's kernel wherever ATen would take it for the whole frame.
    ATen takes its own slower kernel instead for float32 CPU inputs with N*C*T*H <= 20480 (a
    heuristic for small convs), which a band's few rows fall under where the whole frame's do not
    (Wan's 384-channel level of a 768x768 frame in 3 bands: 1.6x the time per row, and other bits).
    oneDNN gives a band's rows bit for bit as its whole-frame conv does."""
    if not _on_onednn(conv, input, args, kwargs):
        return original(input, weight, bias, *args, **kwargs)
    if kwargs.get("autopad") == "causal_zero":  # ComfyUI's one-frame path: the kernel's last time slices only
        weight = weight[:, :, -input.shape[2]:]
    return torch.mkldnn_convolution(input, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups)


def _conv_hook(conv, name: str):
    original = conv._conv_forward
    spread = conv_spread(conv)
    pre = spread - row_part(conv.padding)  # rows of zeros the module put on the input before the conv (ComfyUI 0.3.x)

    def _conv_forward(input, weight, bias, *args, **kwargs):
        me = current()
        if me is None:
            return original(input, weight, bias, *args, **kwargs)
        if me.alone:
            return _convolve(conv, original, input, weight, bias, args, kwargs)
        height = input.shape[-2]
        own = input.narrow(-2, pre, height - 2 * pre)
        rows = own.shape[-2]
        if rows < spread:
            raise RuntimeError(f"exact band [{me.a}, {me.e}) has {rows} rows before {name}, fewer than its conv reads")
        # clones: a view would keep this band's whole input alive in the neighbour's hands
        above, below = me.ask(RowsRequest(me.next(), name, own.narrow(-2, 0, spread).clone(),
                                          own.narrow(-2, rows - spread, spread).clone()))
        if pre in (0, spread) and rows >= 2 * spread and _on_onednn(conv, input, args, kwargs):
            del own
            return _edges_mended(conv, original, input, pre, spread, above, below, weight, bias, kwargs)
        # [above; own; below], spread rows each side (zero rows at the image's edge, as the conv pads
        # there), convolved without row padding: exactly the band's own output rows, no copy of them
        # (0.3.x pads the rows itself before the conv: its zero rows serve at the image's edge)
        padded = pre == spread
        top = input.narrow(-2, 0, pre) if above is None and padded else edge_rows(own, above, spread)
        bottom = input.narrow(-2, height - pre, pre) if below is None and padded else edge_rows(own, below, spread)
        joined = torch.cat([top, own, bottom], -2)
        del own, above, below, input, top, bottom
        with rows_unpadded(conv):
            return _convolve(conv, original, joined, weight, bias, args, kwargs)

    return _conv_forward


def _edges_mended(conv, original, input, pre, spread, above, below, weight, bias, kwargs):
    """The band's input convolved as it is, zero rows beyond its edges (the conv's own row padding,
    or the module's on 0.3.x), then each edge's ``spread`` output rows convolved again from
    [neighbour's rows; own first or last 2 * spread rows] and written over. The same rows as
    convolving [above; own; below], without that band-sized copy of the input, which at the widest
    layer is a third of a frame's activations with 3 bands (oneDNN's rows do not depend on the
    input's height, checked bit for bit by the exact tests)."""
    out = _convolve(conv, original, input, weight, bias, (), kwargs)
    rows = input.shape[-2] - 2 * pre
    for got, start, at in ((above, 0, 0), (below, rows - 2 * spread, rows - spread)):
        if got is None:
            continue
        own = input.narrow(-2, pre + start, 2 * spread)
        part = join_rows([got, own] if at == 0 else [own, got])
        with rows_unpadded(conv):
            out.narrow(-2, at, spread).copy_(_convolve(conv, original, part, weight, bias, (), kwargs))
    return out


def _downsample_hook(conv, name: str):
    """The input is [own rows; one zero row]: where a band lies below, its first row replaces the
    zero row, as in the untiled input (every row of the output is then the band's own)."""
    original = conv._conv_forward

    def _conv_forward(input, weight, bias, *args, **kwargs):
        me = current()
        if me is None:
            return original(input, weight, bias, *args, **kwargs)
        if me.alone:
            return _convolve(conv, original, input, weight, bias, args, kwargs)
        rows = input.shape[-2] - 1
        # the band above reads this band's first row; the band below reads nothing of it
        _, below = me.ask(RowsRequest(me.next(), name, input.narrow(-2, 0, 1).clone(),
                                      input.narrow(-2, rows, 0).clone()))
        if below is not None:
            if rows % 2:
                raise RuntimeError(f"exact band [{me.a}, {me.e}) has an odd number of rows ({rows}) before {name}")
            input = torch.cat([input.narrow(-2, 0, rows), below], -2)
        return _convolve(conv, original, input, weight, bias, args, kwargs)

    return _conv_forward


UPSAMPLE_CHUNK_BYTES = 16 << 20  # the upsampled input of one conv call


def doubled_inner(src, space=None):
    """Nearest x2 of ``src`` [..., m, W] over rows and columns without its first and last row
    ([..., 2m - 2, 2W], contiguous), written into ``space`` (a flat tensor, grown when too small)
    and returned with it. The same values as Upsample(x2 nearest) then narrow then contiguous, in
    one copy and no fresh memory per chunk: while bands ran with blocks mapped afresh (an earlier
    heap rule) each new 16 MiB chunk was 4,096 page faults, twice per chunk."""
    *lead, m, w = src.shape
    shape = (*lead, 2 * m - 2, 2 * w)
    numel = math.prod(shape)
    if space is None or space.numel() < numel:
        space = src.new_empty(numel)
    out = space[:numel].view(shape)

    def put(rows, first, count):  # output rows ``rows`` <- src rows [first, first + count), each twice over
        target = rows.unflatten(-1, (w, 2))
        source = src.narrow(-2, first, count).unsqueeze(-1)
        if rows.shape[-2] == 2 * count:
            target, source = target.unflatten(-3, (count, 2)), source.unsqueeze(-3)
        target.copy_(source.expand_as(target))

    put(out.narrow(-2, 0, 1), 0, 1)
    put(out.narrow(-2, 1, 2 * m - 4), 1, m - 2)
    put(out.narrow(-2, 2 * m - 3, 1), m - 1, 1)
    return out, space


def _upsample_hook(seq, name: str):
    """Upsample x2 then a 3x3 conv, on a band: the upsampled rows exist a chunk at a time, never
    the band's whole (twice its rows at the decoder's widest layer; every band's at once at the
    exchange point). The conv reads one upsampled row beyond each edge: the neighbour's edge row
    before upsampling (zero rows at the image's edge). Chunks start at fixed rows of the image, so
    a row's chunk does not depend on the band count except at band edges."""
    original = seq.forward
    up, conv = list(seq.children())
    factors = up.scale_factor if isinstance(up.scale_factor, (tuple, list)) else (up.scale_factor,)
    doubles = all(float(f) == 2.0 for f in factors)  # nearest x2 over rows and columns: each value twice

    def forward(x):
        me = current()
        if me is None:
            return original(x)
        rows = x.shape[-2]
        above, below = (None, None) if me.alone else me.ask(
            RowsRequest(me.next(), name, x.narrow(-2, 0, 1).clone(), x.narrow(-2, rows - 1, 1).clone()))
        ext = torch.cat([edge_rows(x, above, 1), x, edge_rows(x, below, 1)], -2)  # ext row j: own row j - 1
        del above, below
        # own rows in pre-upsample rows per chunk; chunks end at multiples of ``step`` in the image
        step = max(4, UPSAMPLE_CHUNK_BYTES // (x.shape[:-2].numel() * 4 * x.shape[-1] * x.element_size()))
        first = me.a * rows // max(1, me.e - me.a)  # the band's first row, in this layer's rows
        out = space = None
        i = 0
        while i < rows:
            n = min(step - (first + i) % step, rows - i)
            if doubles:  # up rows [2i - 1, 2(i + n) + 1), written into the previous chunk's memory
                chunk, space = doubled_inner(ext.narrow(-2, i, n + 2), space)
            else:
                chunk = up(ext.narrow(-2, i, n + 2)).narrow(-2, 1, 2 * n + 2).contiguous()
            with rows_unpadded(conv):
                y = conv(chunk)
            del chunk
            if out is None:
                out = y.new_empty(y.shape[:-2] + (2 * rows,) + y.shape[-1:])
            out.narrow(-2, 2 * i, 2 * n).copy_(y)
            del y
            i += n
        return out

    forward.__wrapped__ = original
    return forward


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


def _install(part) -> None:
    down, ups = _padded_downsamples(part), _upsampling_convs(part)
    for i, conv in enumerate(spreading_convs(part)):
        if id(conv) in ups:
            ups[id(conv)].forward = _upsample_hook(ups[id(conv)], f"conv{i}")
            continue
        hook = _downsample_hook if id(conv) in down else _conv_hook
        conv._conv_forward = hook(conv, f"conv{i}")
    for block in part.modules():
        if named(block, "AttentionBlock"):
            block.optimized_attention = _attention_hook(block)


def _remove(part) -> None:
    for conv in spreading_convs(part):
        conv.__dict__.pop("_conv_forward", None)
    for seq in _upsampling_convs(part).values():
        seq.__dict__.pop("forward", None)
    for block in part.modules():
        if named(block, "AttentionBlock"):
            block.optimized_attention = getattr(block.optimized_attention, "__wrapped__", block.optimized_attention)


@contextmanager
def exchanging(part):
    """The hooks on ``part`` (a decoder or an encoder) while the calling band runs (counted: the
    last band takes them off)."""
    with _lock:
        n = _users.get(id(part), 0)
        if n == 0:
            _install(part)
        _users[id(part)] = n + 1
    try:
        yield
    finally:
        with _lock:
            n = _users[id(part)] - 1
            if n == 0:
                _remove(part)
                del _users[id(part)]
            else:
                _users[id(part)] = n


__all__ = ["exchanging", "refusal", "spreading_convs"]
