"""Parallel Tiled VAE Encode and Parallel VAE with ComfyUI's real VAEs (random weights, loaded by the
real VAELoader): tiled equals VAE Encode (Tiled), exact equals VAE Encode, on any number of lanes."""
from __future__ import annotations

import time

import pytest
import torch

from testkit import comfy_env, interrupt
from testkit.procs import before_sending, sigkill
from testkit.speeds import even_speeds

TOL = 1e-4


def loads_metadata() -> bool:
    """VAELoader passes the file's metadata (0.9.2+), which the small LTXV's architecture is in."""
    import inspect

    import nodes

    return "metadata" in inspect.getsource(nodes.VAELoader.load_vae)


def pixels(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def scaled_diff(ours, ref) -> float:
    """``diff`` over the reference's magnitude where that passes 1: the random-weight LTXV's latents
    reach about 2.5e3, where one float32 ulp is 2.4e-4 and oneDNN's kernels for 1 and 2 threads
    (a worker lane's count and ComfyUI's here) differ by a few ulps on AVX-512 CPUs."""
    return diff(ours, ref) / max(1.0, ref.abs().max().item())


@pytest.fixture(scope="module")
def backends(pack):
    yield pack.nodes.backends
    pack.nodes.backends.shutdown()


@pytest.fixture(scope="module")
def encode(pack):
    node = comfy_env.node_clone(pack.nodes.ParallelVAEEncode, {"UNIQUE_ID": "5"})

    def run(px, vae, tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8, devices="cpu", mode="tiled"):
        with torch.inference_mode():
            out = node.execute(px, vae, tile_size, overlap, temporal_size, temporal_overlap, devices, mode=mode)
        return out.result[0]["samples"]

    return run


@pytest.fixture(scope="module")
def core(comfy):
    class Core:
        @staticmethod
        def encode(px, vae):
            with torch.inference_mode():
                return comfy.VAEEncode().encode(vae, px)[0]["samples"]

        @staticmethod
        def tiled(px, vae, tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8):
            with torch.inference_mode():
                return comfy.VAEEncodeTiled().encode(vae, px, tile_size, overlap, temporal_size, temporal_overlap)[0][
                    "samples"]

    return Core


@pytest.mark.every_runtime
@pytest.mark.parametrize("devices", ["cpu", "cpu:2"])
def test_tiled_equals_vae_encode_tiled_for_image_and_video_vaes(pack, load_vae, encode, core, backends, devices,
                                                                torch_threads):
    sd = load_vae("sd")
    px = pixels((2, 139, 75, 3), 1)  # batch of 2, not square, not a multiple of 8: cropped as core crops
    ours = encode(px, sd, 64, 16, devices=devices)
    assert ours.shape == (2, 4, 17, 9) and ours.dtype == torch.float32
    assert diff(ours, core.tiled(px, sd, 64, 16)) <= TOL

    flux = load_vae("flux")
    px = pixels((1, 80, 64, 3), 2)
    assert diff(encode(px, flux, 64, 16, devices=devices), core.tiled(px, flux, 64, 16)) <= TOL

    if not loads_metadata():
        return  # this ComfyUI's VAELoader drops the small LTXV's config: another model (Wan covers video here)
    ltxv = load_vae("ltxv_meta")  # non-causal video: cut in time as VAE Encode (Tiled) cuts it
    video = pixels((17, 160, 200, 3), 3)
    ours = encode(video, ltxv, 64, 16, 16, 8, devices=devices)
    assert ours.shape == (1, 128, 3, 5, 6)
    assert scaled_diff(ours, core.tiled(video, ltxv, 64, 16, 16, 8)) <= TOL
    if devices == "cpu:2":  # at a lane's one torch thread, the same tiles give the same bits as core's
        torch_threads(1)
        assert diff(ours, core.tiled(video, ltxv, 64, 16, 16, 8)) == 0


@pytest.mark.every_runtime
@pytest.mark.parametrize("frames", [1, 17])
def test_causal_video_is_never_cut_in_time(load_vae, encode, core, backends, frames):
    wan = load_vae("wan21")
    video = pixels((frames, 72, 88, 3), 4)
    ours = encode(video, wan, 64, 16, 16, 8, devices="cpu:2")  # temporal_size 16 would cut 17 frames
    assert ours.shape == (1, 16, (frames + 3) // 4, 9, 11)
    assert diff(ours, core.tiled(video, wan, 64, 16, 4096, 8)) <= TOL  # VAE Encode (Tiled), one temporal tile
    if frames == 17:
        assert diff(ours, core.tiled(video, wan, 64, 16, 16, 8)) > 1e-2, "core's temporal tiles restart the cache"
    whole = encode(video, wan, 512, 16, 16, 8)  # a whole-frame tile: VAE Encode itself
    assert diff(whole, core.encode(video, wan)) <= TOL


@pytest.mark.every_runtime
def test_exact_equals_vae_encode_and_does_not_depend_on_bands_or_workers(load_vae, encode, core, backends,
                                                                         torch_threads, monkeypatch, block_reuse):
    monkeypatch.setenv(backends.THREADS_ENV, "1")  # one torch thread per lane: bit-identity holds
    torch_threads(1)
    for family, channels in (("sd", 4), ("flux", 16)):
        vae = load_vae(family)
        px = pixels((1, 200, 136, 3), 5)  # 25 latent rows: no band count divides them
        ref = core.encode(px, vae)
        first = encode(px, vae, 0, devices="cpu", mode="exact")
        # the encoder's shapes fragment a heap that reuses large blocks: it maps them afresh (heap.py)
        assert block_reuse and not any(block_reuse)
        assert first.shape == (1, channels, 25, 17)
        assert diff(first, ref) <= TOL
        runs = (("cpu", 128), ("cpu:2", 512), ("cpu:3", 512)) if family == "sd" else (("cpu:2", 512),)
        for devices, tile in runs:
            assert torch.equal(encode(px, vae, tile, devices=devices, mode="exact"), first), (family, devices, tile)
    px = pixels((2, 96, 64, 3), 6)  # a batch
    sd = load_vae("sd")
    assert diff(encode(px, sd, 0, devices="cpu:2", mode="exact"), core.encode(px, sd)) <= TOL


def run_bands(pack, ex, x, spans, own_stats=False, edges=True, gather=True):
    """Drive exact encode bands (latent rows ``spans``) in this thread; ``own_stats`` normalises each
    band with its own statistics (what independent tiles do); ``edges=False`` withholds the
    neighbours' rows (each conv and downsample zero-pads at band edges); ``gather=False`` lets each
    band attend over its own keys only."""
    lockstep, stats = pack.parallel_vae.exact.lockstep, pack.parallel_vae.exact.stats
    gens = [ex.band(x, a, e) for a, e in spans]
    out = [None] * len(gens)
    requests = [None] * len(gens)
    for i, g in enumerate(gens):  # a band alone (Wan's) may finish without a single exchange
        try:
            requests[i] = g.send(None)
        except StopIteration as stop:
            out[i] = stop.value
    while any(r is not None for r in requests):
        first = requests[0]
        if isinstance(first, lockstep.RowsRequest) and not edges:
            replies = [(None, None)] * len(gens)
        elif isinstance(first, lockstep.StatsRequest) and own_stats:
            replies = [stats.combine([r.moments], r.eps) for r in requests]
        elif isinstance(first, lockstep.GatherRequest) and not gather:
            replies = [r.part for r in requests]
        else:
            replies = lockstep.answers(requests)
        for i, g in enumerate(gens):
            try:
                requests[i] = g.send(replies[i])
            except StopIteration as stop:
                out[i], requests[i] = stop.value, None
    return torch.cat(out, -2)


def test_the_exchange_between_bands_matters(pack, load_vae):
    """Bands encoded with their own statistics, or without their neighbours' edge rows, differ
    visibly from the untiled encode: the combine is what makes exact mode exact."""
    vae = load_vae("sd")
    model = vae.first_stage_model
    ex = pack.parallel_vae.families.exact_executor("image", model, torch.float32, "cpu", "encode")
    x = pixels((1, 3, 160, 64), 16) * 2 - 1
    spans = pack.parallel_vae.exact.geometry.split_rows(20, 3)
    with torch.inference_mode():
        ref = model.encode(x)
        exact = run_bands(pack, ex, ex.prefix(x), spans)
        alone = run_bands(pack, ex, ex.prefix(x), spans, own_stats=True)
        padded = run_bands(pack, ex, ex.prefix(x), spans, edges=False)
    assert diff(exact, ref) <= TOL
    assert diff(alone, exact) > 1e-2, "per-band statistics should visibly change the latent"
    assert diff(padded, exact) > 1e-2, "zero padding at band edges should visibly change the latent"


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_band_alignment_from_the_layers_is_the_encoders_downscale(pack, load_vae, family):
    """A probe: the pixel rows per latent row the executor works out from the encoder's levels is
    the downscale the encoder measures on an input, so every level's band edges fall on whole rows."""
    model = load_vae(family).first_stage_model
    ex = pack.parallel_vae.families.exact_executor("image", model, torch.float32, "cpu", "encode")
    for height in (64, 136):
        with torch.inference_mode():
            z = model.encode(pixels((1, 3, height, 32), 17))
        assert height == z.shape[-2] * ex.in_rows and ex.in_rows == 8


def test_auto_is_exact_where_supported_else_tiled_and_says_which(load_vae, encode, core, pack, backends):
    sd = load_vae("sd")
    px = pixels((1, 96, 80, 3), 7)
    assert diff(encode(px, sd, 0, mode="auto"), core.encode(px, sd)) <= TOL
    ltxv = load_vae("ltxv_meta")
    video = pixels((9, 96, 96, 3), 8)
    assert scaled_diff(encode(video, ltxv, 64, 16, 16, 8, mode="auto"), core.tiled(video, ltxv, 64, 16, 16, 8)) <= TOL
    errors = pack.parallel_vae.errors
    with pytest.raises(errors.InputError, match=r"^mode: exact is not available for .*Use mode=tiled"):
        encode(video, ltxv, 64, 16, 16, 8, mode="exact")


@pytest.mark.parametrize("family", ["sd", "wan21"])
def test_sigkill_of_a_worker_mid_encode_gives_the_same_latent_and_a_full_pool(load_vae, encode, core, backends,
                                                                              source_of, family):
    vae = load_vae(family)
    px = pixels((1, 192, 192, 3), 9) if family == "sd" else pixels((5, 128, 128, 3), 9)
    encode(pixels((1, 64, 64, 3), 10), vae, 64, 16, devices="cpu:2")  # warm: both workers hold the VAE
    pool = backends.local_pool()
    restarts = pool.stats.restarts
    victim = pool.pids()["cpu[1]"]
    killed = before_sending(pool, "cpu[1]", "Task", sigkill)  # dies holding a tile
    ours = encode(px, vae, 64, 16, devices="cpu:2")
    assert killed.is_set(), "the worker never got a task"
    assert pool.stats.restarts == restarts + 1
    assert diff(ours, core.tiled(px, vae, 64, 16)) <= TOL
    ready = pool.wait_ready(source_of(vae))
    assert len(ready) == 2 and victim not in ready.values()


def test_interrupt_mid_encode_returns_within_2_s_and_the_next_prompt_succeeds(comfy, load_vae, encode, core,
                                                                              backends, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    vae = load_vae("sd")
    encode(pixels((1, 64, 64, 3), 11), vae, 64, 16, devices="cpu:2")  # warm
    units = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, *a, **k: units.append(value))
    press = interrupt.Press(lambda: max(units, default=0) >= 2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            encode(pixels((1, 512, 512, 3), 12), vae, 64, 16, devices="cpu:2")  # ~300 tiles
        returned = time.monotonic() - press.at
    finally:
        press.stop()
    assert returned < 2.0, f"returned {returned:.2f} s after the interrupt"
    small = pixels((1, 80, 64, 3), 13)
    assert diff(encode(small, vae, 64, 16, devices="cpu:2"), core.tiled(small, vae, 64, 16)) <= TOL


def test_a_decode_after_an_encode_with_the_same_vae_ships_no_weights(load_vae, encode, decode, backends, hold_vae):
    vae = load_vae("sd")
    latent = encode(pixels((1, 96, 96, 3), 14), vae, 64, 16, devices="cpu:2")
    pool = backends.local_pool()
    hold_vae(pool, vae)
    sent, loads = pool.stats.weights_bytes, pool.stats.loads
    decode(latent, vae, 64, 16, devices="cpu:2")
    assert (pool.stats.weights_bytes, pool.stats.loads) == (sent, loads), "the encode's copy decodes too"


def test_progress_names_the_mode_and_each_lane(load_vae, encode, pack, backends, monkeypatch):
    texts = []
    monkeypatch.setattr(pack.nodes.progress, "send_text", lambda text, node_id: texts.append(text))
    encode(pixels((1, 128, 96, 3), 15), load_vae("sd"), 0, devices="cpu:2", mode="exact")
    assert "exact, " in texts[-1] and "cpu[0]" in texts[-1] and "cpu[1]" in texts[-1], texts[-1]


@pytest.mark.parametrize("bad, says", [
    (torch.full((1, 64, 64, 3), float("nan")), "pixels: contains 12288 NaN or inf values"),
    (torch.zeros((0, 64, 64, 3)), "pixels: is empty"),
    (torch.rand((1, 6, 64, 3)), "pixels: 64x6 px is smaller than one latent pixel"),
    (torch.rand((1, 64, 64, 2)), "pixels: has 2 channels; the image VAE"),
    (torch.rand((64, 64, 3)), "pixels: expected an IMAGE [B, H, W, C], got a 3-D tensor"),
])
def test_bad_pixels_are_a_clear_error_naming_the_input(pack, load_vae, encode, core, backends, bad, says):
    with pytest.raises(pack.parallel_vae.errors.InputError) as e:
        encode(bad, load_vae("sd"), devices="cpu:2")
    assert str(e.value).startswith(says), str(e.value)
    good = pixels((1, 64, 64, 3), 18)
    assert diff(encode(good, load_vae("sd"), devices="cpu:2"), core.tiled(good, load_vae("sd"))) <= TOL


def test_an_overlap_the_grid_cannot_walk_is_refused(pack, load_vae, encode):
    with pytest.raises(pack.parallel_vae.errors.InputError, match=r"^overlap: 32 px must be smaller than the narrow"):
        encode(pixels((1, 256, 256, 3), 19), load_vae("sd"), 64, 32)


@pytest.mark.every_runtime
def test_parallel_vae_gives_core_nodes_the_same_results(comfy, pack, load_vae, backends):
    """VAE Encode and VAE Decode fed the Parallel VAE (exact, cpu:2) equal them fed the plain VAE,
    and so does WanImageToVideo, which encodes its start image and grey frames inside itself."""
    from comfy_extras import nodes_wan

    sd = load_vae("sd")
    (parallel,) = pack.nodes.ParallelVAE.execute(sd, "cpu:2", "exact", 0).result
    assert parallel is not sd and not hasattr(sd, pack.nodes.vae_wrapper.BASE), "the input VAE is unchanged"
    px = pixels((1, 96, 72, 3), 20)
    with torch.inference_mode():
        plain = comfy.VAEEncode().encode(sd, px)[0]["samples"]
        assert diff(comfy.VAEEncode().encode(parallel, px)[0]["samples"], plain) <= TOL
        decoded = comfy.VAEDecode().decode(parallel, {"samples": plain})[0]
        assert diff(decoded, comfy.VAEDecode().decode(sd, {"samples": plain})[0]) <= TOL

    wan = load_vae("wan21")
    (parallel,) = pack.nodes.ParallelVAE.execute(wan, "cpu:2", "auto", 512).result
    conditioning = [[torch.zeros(1, 4, 8), {}]]
    args = dict(positive=conditioning, negative=conditioning, width=80, height=64, length=9, batch_size=1,
                start_image=pixels((1, 64, 80, 3), 21))
    with torch.inference_mode():
        ours = nodes_wan.WanImageToVideo.execute(vae=parallel, **args).result
        core = nodes_wan.WanImageToVideo.execute(vae=wan, **args).result
    concat = ours[0][0][1]["concat_latent_image"]
    assert concat.shape == (1, 16, 3, 8, 10)
    assert diff(concat, core[0][0][1]["concat_latent_image"]) <= TOL
    assert diff(ours[2]["samples"], core[2]["samples"]) == 0


@pytest.mark.every_runtime  # Wan 2.1's encoder takes frames in pairs with deferral on 0.33, in fours on 0.3.75
@pytest.mark.parametrize("family, frames, height", [("wan21", 1, 256), ("wan21", 9, 256), ("wan22", 5, 128)])
def test_wan_exact_equals_vae_encode_on_any_number_of_bands_and_workers(load_vae, encode, core, backends,
                                                                        torch_threads, monkeypatch, family,
                                                                        frames, height, runtime_version,
                                                                        band_heaps):
    monkeypatch.setenv(backends.THREADS_ENV, "1")
    torch_threads(1)
    if runtime_version >= (0, 33):
        same = torch.equal
    else:  # 0.3.75 encodes Wan 2.1 in 4-frame calls: oneDNN's 3-D convs there round by the band's height
        same = lambda a, b: diff(a, b) <= 1e-5  # noqa: E731
    vae = load_vae(family)
    video = pixels((frames, height, 80, 3), 22)
    ref = core.encode(video, vae)
    whole = encode(video, vae, 0, mode="exact")  # one band
    assert whole.shape == ref.shape and diff(whole, ref) <= TOL
    for devices in ("cpu", "cpu:2") if family == "wan21" else ("cpu",):
        even_speeds(backends.local_pool())  # the workers' bands as high as the in-process ones
        # tile_size 128: bands of 8+ latent rows are bit-identical to one band;
        # tile_size 64: bands a few rows high (oneDNN picks other conv kernels there) stay within TOL
        assert same(encode(video, vae, 128, devices=devices, mode="exact"), whole), devices
        if devices == "cpu":
            assert diff(encode(video, vae, 64, devices=devices, mode="exact"), ref) <= TOL
    # the encoder's largest blocks are mapped anyway: its band threads leave the allocator alone
    assert band_heaps and not any(band_heaps)


@pytest.mark.every_runtime  # the hooks sit on ComfyUI's Wan modules, whose padding and calls changed between runtimes
@pytest.mark.parametrize("family, frames, height", [("wan21", 5, 256), ("wan22", 1, 256)])
def test_wan_encode_bands_exchange_edges_rows_below_and_keys(pack, load_vae, one_thread, family, frames, height,
                                                             runtime_version):
    """Wan encode bands read only their own rows: each conv's edge rows, the row below each stride-2
    downsample and the middle attention's keys come from the neighbours. Withholding any of them
    changes the latent visibly; with them, 1, 2 and 4 bands give the untiled encode's latent, and
    the band alignment from the layers is the encoder's downscale."""
    model = load_vae(family).first_stage_model
    ex = pack.parallel_vae.families.exact_executor(family, model, torch.float32, "cpu", "encode")
    assert ex.in_rows == (16 if family == "wan22" else 8)
    x = pixels((1, 3, frames, height, 80), 23) * 2 - 1
    rows = height // ex.in_rows
    split = pack.parallel_vae.exact.geometry.split_rows
    with torch.inference_mode():
        ref = model.encode(x)
        x_in = ex.prefix(x)
        one = run_bands(pack, ex, x_in, [(0, rows)])
        two = run_bands(pack, ex, x_in, split(rows, 2))
        four = run_bands(pack, ex, x_in, split(rows, 4))
        padded = run_bands(pack, ex, x_in, split(rows, 2), edges=False)
        own_keys = run_bands(pack, ex, x_in, split(rows, 2), gather=False)
    assert ref.shape[-2] == rows and diff(one, ref) <= TOL
    # Wan 2.1's bands of 8+ latent rows take the same oneDNN kernels as one band on 0.33 (bit for bit);
    # 0.3.75's pre-padded 3-D convs, and Wan 2.2's 1024-channel layers on bands a few rows high, round
    # by the band's height (as in decode)
    bitwise = runtime_version >= (0, 33) and family == "wan21"
    same = torch.equal if bitwise else (lambda a, b: diff(a, b) <= 1e-5)
    assert same(two, one), f"two bands differ from one by {diff(two, one)}"
    assert same(four, one), f"four bands differ from one by {diff(four, one)}"
    assert diff(padded, one) > 1e-2, "zero rows at band edges should visibly change the latent"
    assert diff(own_keys, one) > 1e-3, "attending over a band's own keys should change the latent"


def test_out_of_memory_on_a_worker_splits_the_bands_and_gives_the_same_latent(load_vae, encode, backends,
                                                                             monkeypatch):
    """Exact encode bands in lock-step: the group that runs out of memory makes the item start again
    with every band split in two (bands of 8 latent rows and more stay bit-identical)."""
    from testkit import faults

    vae = load_vae("sd")
    px = pixels((1, 512, 64, 3), 25)  # 64 latent rows: 4 bands of 16 at tile_size 96, then 8 of 8
    clean = encode(px, vae, 96, devices="cpu:2", mode="exact")
    with faults.injected(monkeypatch, "oom:2:cpu[1]", backends):
        again = encode(px, vae, 96, devices="cpu:2", mode="exact")
        events = [text for _, text in backends.local_pool().stats.events]
    assert any("out of memory; bands split 2 ways" in text for text in events), events
    assert torch.equal(again, clean)
