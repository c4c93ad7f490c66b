"""Exact mode in ComfyUI's process: equal to the untiled VAE Decode (<= 1e-4 in float32) on
random-weight VAEs loaded through the real VAELoader, and bit-identical whatever the band count
at one torch thread (see one_thread). (tests/comfy/test_exact_workers.py runs the same on worker
processes.)"""
from __future__ import annotations

import pytest
import torch

from testkit.compare import TOL, latent, max_diff

SD_Z = (2, 4, 21, 14)  # batch 2, not square, 21 rows: no band count here divides it


def test_sd_exact_equals_untiled_vae_decode_and_is_bit_identical_across_band_counts(pack, load_vae, decode,
                                                                                      core_decode, one_thread,
                                                                                      decodes, block_reuse):
    vae = load_vae("sd")
    z = latent(SD_Z, 3)
    ref = core_decode(z, vae)
    outputs = {}
    # a band's own rows hold at most tile_size^2 pixels: 14 latent columns are 112 px wide
    for tile_size, bands in ((512, 1), (128, 2), (96, 3)):
        outputs[bands] = decode(z, vae, tile_size, 64, devices="cpu", mode="exact")
        assert len(decodes.last.units) == bands * SD_Z[0], "band count"
        assert max_diff(outputs[bands], ref) <= TOL, f"{bands} bands"
    assert torch.equal(outputs[2], outputs[1]) and torch.equal(outputs[3], outputs[1])
    # each item asks for a heap that reuses large blocks (a worker's only: heap.Heap.reusing_blocks)
    assert block_reuse and all(block_reuse)


def test_flux_style_exact_equals_untiled_vae_decode(pack, load_vae, decode, core_decode, one_thread, decodes):
    vae = load_vae("flux")
    z = latent((1, 16, 13, 10), 4)
    three = decode(z, vae, 64, 32, devices="cpu", mode="exact")
    assert len(decodes.last.units) == 3
    assert max_diff(three, core_decode(z, vae)) <= TOL
    assert torch.equal(three, decode(z, vae, 512, 64, devices="cpu", mode="exact"))


@pytest.mark.every_runtime  # the Wan decoder's layout changed between runtimes (pairs of latent frames)
@pytest.mark.parametrize("family,shape,bands", [
    ("wan21", (1, 16, 4, 19, 4), 2),  # 4 latent frames: 1, then pairs or singles (as the decoder takes them)
    ("wan21", (1, 16, 1, 40, 2), 2),  # one latent frame: one decoder call, without a causal cache on 0.33
    ("wan22", (1, 48, 2, 9, 2), 2),
])
def test_wan_exact_equals_untiled_vae_decode(pack, load_vae, decode, core_decode, stream_of, to_images, decodes,
                                             band_heaps, block_reuse, family, shape, bands):
    vae = load_vae(family)
    z = latent(shape, 5)
    ours = decode(z, vae, 64, 16, devices="cpu", mode="exact")
    assert len({t for t, *_ in decodes.last.units}) == bands
    assert band_heaps == [True], "several band threads on the CPU: each band gives back what it freed as its turn ends (heap.py)"
    assert block_reuse == [False], "Wan bands in threads: a heap that reuses large blocks would keep them per thread"
    assert max_diff(ours, core_decode(z, vae)) <= TOL
    if family == "wan21":  # the stream walks frames (every band's cache alive), the IMAGE node bands
        streamed = to_images(stream_of(z, vae, 64, 16, devices="cpu", mode="exact"))
        assert torch.equal(streamed, ours), "the stream (frame order) differs from the IMAGE node (band order)"


def test_the_default_mode_is_exact_for_sd_and_tiled_for_taehv(pack, load_vae, decode, core_decode, core_tiled):
    sd = load_vae("sd")
    z = latent((1, 4, 12, 10), 6)
    assert max_diff(decode(z, sd, 64, 16, devices="cpu", mode=None), core_decode(z, sd)) <= TOL
    taehv = load_vae("taehv")
    zt = latent((1, 16, 3, 6, 5), 7)
    assert max_diff(decode(zt, taehv, 64, 16, devices="cpu", mode=None), core_tiled(zt, taehv, 64, 16)) <= TOL


def test_exact_on_an_unsupported_vae_is_an_error_naming_the_supported_families(pack, load_vae, decode):
    errors = pack.parallel_vae.errors
    with pytest.raises(errors.InputError) as info:
        decode(latent((1, 16, 3, 6, 5), 7), load_vae("taehv"), 64, 16, devices="cpu", mode="exact")
    message = str(info.value)
    assert message.startswith("mode:") and "Wan 2.1" in message and "SDXL" in message and "tiled" in message
    with pytest.raises(errors.InputError, match="^mode: 'fast' is not one of auto, exact, tiled"):
        decode(latent((1, 4, 8, 8), 1), load_vae("sd"), 64, 16, devices="cpu", mode="fast")
    assert "mode" in pack.nodes.ParallelVAEDecode.validate_inputs(64, 16, 64, 8, "cpu", "fast")
    with pytest.raises(errors.InputError, match="^sharding: 'most' is not one of auto, every device"):
        decode(latent((1, 4, 8, 8), 1), load_vae("sd"), 64, 16, devices="cpu:2", mode="exact", sharding="most")
    assert pack.nodes.ParallelVAEDecode.validate_inputs(64, 16, 64, 8, "cpu", "auto", "most").startswith("sharding:")


# --- the method itself, on ComfyUI's decoder modules ------------------------------------------
def run_bands(pack, ex, z, spans, combine=True, edges=True):
    """Drive SD bands over latent rows ``spans``; ``combine=False`` normalises each band with its own
    statistics (what independent tiles do); ``edges=False`` withholds the neighbours' edge rows
    (each conv zero-pads at band edges)."""
    lockstep = pack.parallel_vae.exact.lockstep
    stats = pack.parallel_vae.exact.stats
    gens = [ex.band(z, a, e) for a, e in spans]
    requests = [g.send(None) for g in gens]
    out = [None] * len(gens)
    while any(r is not None for r in requests):
        if isinstance(requests[0], lockstep.RowsRequest):
            replies = lockstep.answers(requests) if edges else [(None, None)] * len(gens)
        elif combine or isinstance(requests[0], lockstep.GatherRequest):
            replies = lockstep.answers(requests)
        else:
            replies = [stats.combine([r.moments], r.eps) for r in requests]
        for i, g in enumerate(gens):
            try:
                requests[i] = g.send(replies[i])
            except StopIteration as stop:
                out[i], requests[i] = stop.value, None
    return torch.cat(out, -2)


def test_without_the_statistics_combine_or_the_edge_rows_the_bands_differ(pack, load_vae):
    vae = load_vae("sd")
    z = latent((1, 4, 40, 8), 8)
    ex = pack.parallel_vae.exact.SdExact(vae.first_stage_model, torch.float32, "cpu")
    spans = pack.parallel_vae.exact.geometry.split_rows(40, 3)
    with torch.inference_mode():
        exact = run_bands(pack, ex, z, spans)
        alone = run_bands(pack, ex, z, spans, combine=False)
        padded = run_bands(pack, ex, z, spans, edges=False)
        ref = vae.first_stage_model.decode(z)
    assert max_diff(exact, ref) <= TOL
    assert max_diff(alone, exact) > 1e-2, "per-band statistics should visibly change the image"
    assert max_diff(padded, exact) > 1e-2, "zero padding at band edges should visibly change the image"


def run_wan_bands(pack, ex, z, spans, edges=True, gather=True):
    """Drive Wan bands (each in its own thread, exact/threads.py) over latent rows ``spans``;
    ``edges=False`` withholds the neighbours' edge rows (each conv zero-pads at band edges),
    ``gather=False`` lets each band attend over its own keys only (what independent tiles do)."""
    lockstep, threads = pack.parallel_vae.exact.lockstep, pack.parallel_vae.exact.threads
    whole = ex.prefix(z)
    gens = [ex.band(whole, a, e) for a, e in spans]
    frames: list = [[] for _ in gens]
    requests = [g.send(None) for g in gens]
    while any(r is not None for r in requests):
        if isinstance(requests[0], threads.Output):
            for i, r in enumerate(requests):
                frames[i] += r.value
            replies = [None] * len(gens)
        elif isinstance(requests[0], lockstep.RowsRequest):
            replies = lockstep.answers(requests) if edges else [(None, None)] * len(gens)
        else:
            replies = lockstep.answers(requests) if gather else [r.part for r in requests]
        for i, g in enumerate(gens):
            try:
                requests[i] = g.send(replies[i])
            except StopIteration:
                requests[i] = None
    return torch.cat([torch.cat(f, 2) for f in frames], -2)


@pytest.mark.every_runtime  # the hooks sit on ComfyUI's Wan modules, whose padding changed between runtimes
def test_wan_bands_exchange_edges_and_keys_and_are_bit_identical_across_band_counts(pack, load_vae, one_thread,
                                                                                    monkeypatch):
    """Wan 2.1 here; Wan 2.2 runs the same hooks (test_wan_exact_equals_untiled_vae_decode bands it).
    Wan 2.2's bands agree with one band to 1e-5, not bit for bit, at the few-row sizes a test can
    afford: its 1024-channel layers take another oneDNN conv kernel on inputs 16 rows high."""
    family, shape = "wan21", (1, 16, 3, 24, 3)
    vae = load_vae(family)
    ex = pack.parallel_vae.families.exact_executor(family, vae.first_stage_model, vae.vae_dtype, "cpu")
    assert pack.parallel_vae.families.exact_rounds(family, vae.first_stage_model) > 0
    z = latent(shape, 10)
    rows = shape[-2]
    split = pack.parallel_vae.exact.geometry.split_rows
    with torch.inference_mode():
        one = run_wan_bands(pack, ex, z, [(0, rows)])
        two = run_wan_bands(pack, ex, z, split(rows, 2))
        three = run_wan_bands(pack, ex, z, split(rows, 3))
        padded = run_wan_bands(pack, ex, z, split(rows, 2), edges=False)
        own_keys = run_wan_bands(pack, ex, z, split(rows, 2), gather=False)
        untiled = vae.first_stage_model.decode(z.to(vae.vae_dtype))
        # upsample + conv a few rows at a time (at real sizes a band's upsampled rows are never whole)
        ups = [seq[1] for seq in vae.first_stage_model.decoder.modules()
               if isinstance(seq, torch.nn.Sequential) and len(seq) == 2 and type(seq[0]).__name__ == "Upsample"]
        assert ups, "Wan's up path has Upsample-then-conv layers"
        calls = []  # their convs' calls
        handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in ups]
        run_wan_bands(pack, ex, z, split(rows, 2))
        whole_calls = len(calls)
        monkeypatch.setattr(pack.parallel_vae.exact.wan_rows, "UPSAMPLE_CHUNK_BYTES", 1)
        chunked = run_wan_bands(pack, ex, z, split(rows, 2))
        assert len(calls) - whole_calls > 2 * whole_calls, "the bands should upsample a few rows at a time"
        for h in handles:
            h.remove()
        chunked_one = run_wan_bands(pack, ex, z, [(0, rows)])
    assert max_diff(one, untiled) <= TOL
    assert torch.equal(one, two), "two bands differ from one"
    assert torch.equal(one, three), "three bands differ from one"
    # oneDNN picks another kernel for convs of a few hundred pixels (these chunks); at real widths
    # a conv's rows do not depend on its height (docs/BENCHMARKS.md), so chunks change no bit there
    assert max_diff(chunked, one) <= 1e-5, "upsampling a few rows at a time should agree with whole bands"
    assert max_diff(chunked_one, chunked) <= 1e-5
    assert max_diff(padded, one) > 1e-2, "zero padding at band edges should visibly change the frames"
    assert max_diff(own_keys, one) > 1e-3, "attending over a band's own keys should change the frames"


def test_band_out_of_memory_splits_and_retries_with_the_same_output(pack, load_vae, decode, monkeypatch,
                                                                   one_thread, decodes):
    vae = load_vae("sd")
    # 2 bands of 16 rows, split into 4 of 8 (bit-identity holds for bands of MIN_BAND_ROWS and more)
    z = latent((1, 4, 32, 8), 11)
    clean = decode(z, vae, 96, 16, devices="cpu", mode="exact")
    sd = pack.parallel_vae.exact.sd.SdExact
    original = sd.band
    calls = []

    def failing_once(self, mid, a, e):
        calls.append((a, e))
        if len(calls) == 2:  # the second band of the first attempt, mid-way through the lock-step
            raise torch.OutOfMemoryError("simulated out of memory on a band")
        return (yield from original(self, mid, a, e))

    monkeypatch.setattr(sd, "band", failing_once)
    again = decode(z, vae, 96, 16, devices="cpu", mode="exact")
    first_try = len(decodes.last.units)
    assert torch.equal(again, clean)
    assert len(calls) > 2 * first_try, calls  # the retry ran twice as many (half-height) bands


def test_a_wan_band_out_of_memory_in_its_thread_splits_and_retries_leaving_no_thread(pack, load_vae, decode,
                                                                                     monkeypatch, one_thread, decodes):
    import threading

    vae = load_vae("wan21")
    z = latent((1, 16, 2, 32, 3), 12)  # 2 bands of 16 rows, split into 4 of 8
    clean = decode(z, vae, 64, 16, devices="cpu", mode="exact")
    wan = pack.parallel_vae.exact.wan.WanExact
    original, calls = wan._decode, []

    def failing_once(self, own, channel):
        calls.append(channel.a)
        if len(calls) == 2:  # the second band's thread, while the first waits at its first exchange
            raise torch.OutOfMemoryError("simulated out of memory on a band")
        return original(self, own, channel)

    monkeypatch.setattr(wan, "_decode", failing_once)
    again = decode(z, vae, 64, 16, devices="cpu", mode="exact")
    assert torch.equal(again, clean)
    assert len(calls) == 2 + 4, calls  # the retry ran four half-height bands
    assert not [t for t in threading.enumerate() if t.name.startswith("parallel_vae band")]


def test_the_prefix_attention_in_bounded_slices_equals_comfyuis_split_attention_bit_for_bit(pack, load_vae,
                                                                                          monkeypatch):
    """The executor's mid-block attention holds one query slice of scores at a time; its output
    must be ComfyUI's own split attention's, bit for bit, for any slice size (remainders too)."""
    from comfy.ldm.modules.diffusionmodules import model as comfy_model
    attention = pack.parallel_vae.exact.attention
    block = load_vae("sd").first_stage_model.decoder.mid.attn_1
    monkeypatch.setattr(block, "optimized_attention", comfy_model.normal_attention)
    x = latent((1, block.in_channels, 40, 40), 8) * 3  # 1600 positions

    def sliced(x):  # the block with the executor's attention (a band of every row) in place of ComfyUI's
        h = block.norm(x)
        return x + block.proj_out(attention.attend_band(block.optimized_attention, block.q(h), block.k(h), block.v(h)))

    with torch.inference_mode():
        ref = block(x)
        for rows in (256, 300, 1600, 4000):  # even slices: 7 of 228-229 rows, 6 of 266-267, 1, 1
            monkeypatch.setattr(attention, "SLICE_BYTES", rows * 1600 * 4)
            assert torch.equal(sliced(x), ref), f"{rows} query rows per slice"
        monkeypatch.setattr(attention, "MIN_SLICE_ROWS", 1)  # many one-row slices: other kernels,
        monkeypatch.setattr(attention, "SLICE_BYTES", 1600 * 4)  # the same arithmetic
        assert max_diff(sliced(x), ref) <= 1e-5


def test_a_wan_band_conv_takes_onednn_where_atens_small_conv_rule_would_not(pack, one_thread):
    """ATen convolves float32 CPU inputs with N*C*T*H <= 20480 with its own kernel, not oneDNN's:
    a band's few rows fall under that where the whole frame's do not, and get other bits. The
    band's conv (wan_rows._convolve) takes oneDNN's, whose rows are the whole conv's bit for bit."""
    from comfy.ldm.wan.vae import CausalConv3d

    wan_rows, geometry = pack.parallel_vae.exact.wan_rows, pack.parallel_vae.exact.geometry
    torch.manual_seed(0)
    conv = CausalConv3d(128, 128, 3, padding=1)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    x = latent((1, 128, 1, 200, 48), 20)  # 128 x 200 rows: oneDNN for the whole frame
    joined = x[:, :, :, 79:121]  # own rows [80, 120) and one beyond each edge: 128 x 42, ATen's own kernel
    with torch.inference_mode():
        whole = conv(x)[:, :, :, 80:120]
        with geometry.rows_unpadded(conv):
            ours = wan_rows._convolve(conv, conv._conv_forward, joined, conv.weight, conv.bias, (),
                                      {"autopad": "causal_zero"})
            aten = conv._conv_forward(joined, conv.weight, conv.bias, autopad="causal_zero")
    assert torch.equal(ours, whole), "a band's oneDNN rows should be the whole conv's"
    assert max_diff(aten, whole) <= TOL and not torch.equal(aten, whole), "ATen's kernel gives other bits"
