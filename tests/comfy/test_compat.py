"""What differs between ComfyUI versions, proven on the runtime under test (`make test` runs this
tier on ComfyUI 0.33.0 and on 0.3.75). Tests of a behaviour that exists only on newer runtimes
check the older one's own behaviour instead, or say why there is nothing to check there."""
from __future__ import annotations

import inspect
import logging

import av
import numpy as np
import pytest
import torch

from testkit.compare import TOL, latent, max_diff

pytestmark = pytest.mark.every_runtime

CHANNELS = {"wan21": 16, "wan22": 48, "taehv": 16}
LATENT_FRAMES = {"wan21": (1, 2, 3, 4, 5), "wan22": (1, 2, 3), "taehv": (1, 2, 3, 4, 5)}
PROBE = {"wan21": (3, 4), "wan22": (1, 2), "taehv": (3, 4)}  # latent height, width


# --- causal steppers: bit-identical to the model's own decode, on every runtime ----------------
@pytest.mark.parametrize("family", sorted(CHANNELS))
def test_stepper_is_trusted_and_bit_identical_to_decode(pack, load_vae, family):
    """Wan 2.1 decodes in pairs of latent frames from ComfyUI 0.18 and per frame before; either way
    every step yields its own frames (1, then 4 per latent frame) and they equal decode() exactly."""
    families = pack.parallel_vae.families
    vae = load_vae(family)
    dec = families.make_decoder(family, vae.first_stage_model, vae.vae_dtype, vae.device,
                                latent_channels=CHANNELS[family])
    assert type(dec) is families.of(family).stepper, \
        f"the {family} stepper did not pass its check against decode() on this ComfyUI"
    for t in LATENT_FRAMES[family]:
        z = latent((1, CHANNELS[family], t) + PROBE[family], 30 + t)
        with torch.inference_mode():
            steps = list(dec.steps(z))
            whole = vae.first_stage_model.decode(z.to(vae.vae_dtype)).float()
        assert [s.shape[2] for s in steps] == [1] + [4] * (t - 1), f"{t} latent frames"
        assert torch.equal(torch.cat(steps, 2), whole), f"{t} latent frames"


def test_a_stepper_that_disagrees_with_decode_falls_back_to_whole_tiles(pack, load_vae, decode, core_tiled,
                                                                         monkeypatch, caplog):
    """The guard that turns a changed model into a slowdown instead of wrong pixels."""
    models, families = pack.parallel_vae.models, pack.parallel_vae.families
    stepper = models.wan.WanStepper
    real_steps = stepper.steps

    def off_by_a_little(self, z, step_frames=()):
        for pixels in real_steps(self, z, step_frames):
            yield pixels + 0.01  # what a stepper out of step with a newer ComfyUI would look like

    monkeypatch.setattr(stepper, "steps", off_by_a_little)
    models.check.forget()
    try:
        vae = load_vae("wan21")
        with caplog.at_level(logging.WARNING, logger="parallel_vae"):
            dec = families.make_decoder("wan21", vae.first_stage_model, vae.vae_dtype, vae.device, latent_channels=16)
        assert type(dec) is models.GenericDecoder
        assert "does not match WanVAE.decode" in caplog.text and "decoding whole tiles instead" in caplog.text
        z = latent((1, 16, 3, 10, 14), 41)
        ours = decode(z, vae, 64, 16, devices="cpu")  # the node takes the same path
        assert max_diff(ours, core_tiled(z, vae, 64, 16, 64, 8)) <= TOL
    finally:
        monkeypatch.undo()
        models.check.forget()
    again = families.make_decoder("wan21", vae.first_stage_model, vae.vae_dtype, vae.device, latent_channels=16)
    assert type(again) is stepper, "trusted again once the stepper agrees"


@pytest.mark.parametrize("family", sorted(CHANNELS))
@pytest.mark.parametrize("devices", ["cpu", "cpu:2"])
def test_causal_decode_with_a_whole_frame_tile_is_bit_identical_to_vae_decode(pack, load_vae, decode, core_decode,
                                                                             stream_of, to_images, torch_threads,
                                                                             family, devices):
    """The IMAGE node and the stream node, in-process and on two workers (against VAE Decode run
    with the thread count the decoding worker used: CPU kernels sum in another order on another
    number of threads; a job of one tile gets the idle worker's threads too)."""
    vae = load_vae(family)
    z = latent((1, CHANNELS[family], 3, 4, 5) if family != "wan22" else (1, 48, 2, 1, 2), 50)
    ours, streamed = decode(z, vae, 1024, 64, devices=devices), to_images(stream_of(z, vae, 1024, 64, devices=devices))
    if devices != "cpu":
        torch_threads(sum(s.threads for s in pack.nodes.backends.worker_specs(pack.parallel_vae.devices.parse(devices))))
    ref = core_decode(z, vae)
    assert torch.equal(ours, ref)
    assert torch.equal(streamed, ref)


# --- the VIDEO type ------------------------------------------------------------------------------
def test_png_sequence_video_is_a_complete_video_input_of_this_comfyui(pack, tmp_path):
    from PIL import Image

    vt = pack.nodes.video_types
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(paths[-1])
    video = vt.PngSequenceVideo([str(p) for p in paths], 8.0, (32, 24))  # no abstract method left
    assert isinstance(video, vt.VideoInput) and not type(video).__abstractmethods__
    assert video.get_dimensions() == (32, 24) and video.get_frame_count() == 4 and video.get_duration() == 0.5
    assert tuple(video.get_components().images.shape) == (4, 24, 32, 3)
    # save_to takes whatever keywords this ComfyUI's own videos take (0.25+: bit_depth, crf, ...)
    params = inspect.signature(vt.VideoFromComponents.save_to).parameters
    extra = {k: p.default for k, p in params.items()
             if k not in ("self", "path", "format", "codec", "metadata") and p.default is not inspect.Parameter.empty}
    out = tmp_path / "clip.mp4"
    video.save_to(str(out), format="mp4", codec="h264", metadata=None, **extra)
    with av.open(str(out)) as f:
        assert sum(1 for _ in f.decode(video=0)) == 4
    if "as_trimmed" in vt.VideoInput.__abstractmethods__:  # ComfyUI 0.14+
        trimmed = video.as_trimmed(start_time=0.25, duration=0.25)
        assert trimmed.get_frame_count() == 2
    else:
        assert not hasattr(vt.VideoInput, "as_trimmed"), "0.3.75 has no trimming to delegate"


# --- VAEs rebuilt in workers and on other devices -----------------------------------------------
@pytest.fixture
def metadata_vae(comfy, load_vae):
    if "metadata" not in inspect.getsource(comfy.VAELoader.load_vae):
        pytest.skip("this ComfyUI's VAELoader ignores file metadata (before 0.9.2): it cannot load a VAE "
                    "whose architecture is in its metadata, so the pack never gets one")
    return load_vae("ltxv_meta")


def test_a_vae_whose_architecture_comes_from_metadata_is_rebuilt_exactly_in_workers(pack, metadata_vae, decode,
                                                                                   core_tiled):
    vae = metadata_vae
    z = latent((1, 128, 3, 4, 6), 60)  # 2 x 2 tiles of 4 latent pixels, 2 temporal tiles
    ref = core_tiled(z, vae, 128, 32, 16, 8)
    assert ref.shape == (17, 128, 192, 3) and ref.std() > 0.05
    assert max_diff(decode(z, vae, 128, 32, 16, 8, devices="cpu:2"), ref) <= TOL
    copy = pack.nodes.model.rebuild_on(vae, torch.device("cpu"))
    assert copy.first_stage_model.config == vae.first_stage_model.config


def test_a_rebuild_without_the_metadata_is_a_clear_error_not_a_wrong_decode(pack, metadata_vae, decode,
                                                                           monkeypatch):
    nodes, errors = pack.nodes, pack.parallel_vae.errors
    nodes.backends.shutdown()  # workers that already built it would not build it again
    monkeypatch.setattr(nodes.compat, "rebuild_kwargs", lambda vae: {})  # as if ComfyUI had not kept it
    monkeypatch.setattr(nodes.model, "_fingerprints", type(nodes.model._fingerprints)())
    z = latent((1, 128, 2, 4, 6), 61)
    with pytest.raises(errors.InputError) as e:
        decode(z, metadata_vae, 128, 32, 16, 8, devices="cpu:2")
    assert str(e.value).startswith("vae: ") and "could not rebuild ComfyUI's model" in str(e.value)
    assert "devices=cpu" in str(e.value)
    nodes.model._copies.pop(metadata_vae, None)
    with pytest.raises(errors.ModelMismatch):
        nodes.model.rebuild_on(metadata_vae, torch.device("cpu"))
    monkeypatch.undo()
    nodes.backends.shutdown()  # the other worker may still answer the failed load a moment later
    assert decode(z, metadata_vae, 128, 32, 16, 8, devices="cpu:2").shape == (9, 128, 192, 3)
    nodes.backends.shutdown()


# --- VAEs the pack must not tile itself ------------------------------------------------------------
@pytest.mark.parametrize("family, says", [
    ("seedvr2", "tiles itself"),        # handles_tiling (ComfyUI 0.28+)
    ("minimax_audio", "audio VAE"),     # 2-D latents, 2 output channels (ComfyUI 0.30+)
])
def test_vaes_that_tile_themselves_or_are_audio_are_refused_naming_what_to_use(pack, load_vae, decode, family, says):
    probe = {"seedvr2": "seedvr", "minimax_audio": "minimax"}[family]
    if not _has_module(f"comfy.ldm.{probe}"):
        pytest.skip(f"this ComfyUI has no {family} VAE (0.3.75 predates it)")
    vae = load_vae(family)
    shape = (1, vae.latent_channels, 2, 4, 4) if vae.latent_dim == 3 else (1, vae.latent_channels, 2, 8)
    with pytest.raises(pack.parallel_vae.errors.InputError) as e:
        decode(latent(shape, 70), vae)
    assert str(e.value).startswith("vae: ") and says in str(e.value)
    assert ("VAE Decode (Tiled)" if family == "seedvr2" else "VAE Decode (Audio)") in str(e.value)
    with pytest.raises(pack.parallel_vae.errors.InputError) as e:
        pack.nodes.ParallelVAEEncode.execute(torch.rand(1, 64, 64, 3), vae, 512, 64, 64, 8, "cpu")
    assert str(e.value).startswith("vae: ") and says in str(e.value)
    assert ("VAE Encode (Tiled)" if family == "seedvr2" else "VAE Encode (Audio)") in str(e.value)


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --- nested (audio+video) latents: what core's VAE Decode (Tiled) does on this runtime -----------
def test_nested_latents_do_what_vae_decode_tiled_does_here(pack, load_vae, decode, core_tiled):
    from comfy.nested_tensor import NestedTensor

    vae = load_vae("wan21")
    video, audio = latent((1, 16, 2, 6, 6), 80), latent((1, 8, 5), 81)
    nested = NestedTensor([video, audio])
    if pack.nodes.compat.NESTED_FIRST_PART:  # 0.32+: both decode the video part
        ours = decode(nested, vae, 64, 16)
        assert max_diff(ours, core_tiled(nested, vae, 64, 16, 64, 8)) <= TOL
        assert max_diff(ours, decode(video, vae, 64, 16)) == 0
    else:  # core fails on them: we fail with a message naming the input
        with pytest.raises(Exception):
            core_tiled(nested, vae, 64, 16, 64, 8)
        with pytest.raises(pack.parallel_vae.errors.InputError, match="^samples: nested"):
            decode(nested, vae, 64, 16)


# --- --fp16-intermediates --------------------------------------------------------------------------
@pytest.fixture
def fp16_intermediates():
    import comfy.model_management as mm
    from comfy.cli_args import args

    if not hasattr(mm, "intermediate_dtype"):
        pytest.skip("this ComfyUI has no --fp16-intermediates (added in 0.18)")
    args.fp16_intermediates = True  # what starting ComfyUI with --fp16-intermediates sets
    yield
    args.fp16_intermediates = False


@pytest.mark.parametrize("family, shape", [("sd", (1, 4, 10, 14)), ("wan21", (1, 16, 3, 10, 14))])
@pytest.mark.parametrize("devices", ["cpu", "cpu:2"])
def test_fp16_intermediates_give_vae_decode_tileds_dtype_and_values(pack, load_vae, decode, core_tiled,
                                                                   fp16_intermediates, torch_threads, family, shape,
                                                                   devices):
    vae, z = load_vae(family), latent(shape, 90)
    ours = decode(z, vae, 64, 16, devices=devices)
    if devices != "cpu":  # compare with core on a worker's thread count: float16 rounding would turn
        # the last-bit differences of another summation order into whole float16 steps
        torch_threads(pack.nodes.backends.worker_specs(pack.parallel_vae.devices.parse(devices))[0].threads)
    ref = core_tiled(z, vae, 64, 16, 64, 8)
    assert ours.dtype == ref.dtype
    assert max_diff(ours, ref) <= 1e-6
    # the per-tile rounding to float16 is really there: without it the output differs
    from comfy.cli_args import args

    args.fp16_intermediates = False
    assert max_diff(decode(z, vae, 64, 16, devices=devices), ref) > 1e-5


def test_compat_summary_names_the_runtime(pack):
    line = pack.nodes.compat.summary()
    import comfyui_version

    assert line.startswith(f"ComfyUI {comfyui_version.__version__}") and "?" not in line
