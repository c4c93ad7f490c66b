"""The stream nodes with ComfyUI's real VAEs in-process: Parallel Tiled VAE Decode (Stream), Stream to
Images and Save Video (Stream) against ParallelVAEDecode, files read back with PyAV, bad input,
interrupt, and a stream consumed twice."""
from __future__ import annotations

import os
import threading
import time

import av
import numpy as np
import pytest
import torch

from testkit import procs, sound
from testkit.compare import latent
from testkit.latents import read_png


@pytest.fixture(scope="module")
def nodes(pack):
    yield pack.nodes
    pack.nodes.backends.shutdown()


@pytest.mark.parametrize("devices", ["cpu", "cpu:2"])
def test_causal_stream_equals_parallel_decode_exactly_in_batches_in_order(load_vae, decode, stream_of, to_images,
                                                                          devices):
    wan, z = load_vae("wan21"), latent((1, 16, 4, 10, 14), 21)  # 13 frames, 4 spatial tiles
    expected = decode(z, wan, 64, 16, devices=devices)
    stream = stream_of(z, wan, devices=devices, frames_per_batch=3)
    batches = []
    with stream.open() as s:
        for b in s:
            batches.append((b.start, b.frames.shape[0], b.total))
    assert batches == [(i, min(3, 13 - i), 13) for i in range(0, 13, 3)], "frame order, full batches, then the rest"
    assert torch.equal(to_images(stream_of(z, wan, devices=devices)), expected), "bit-identical to the decode node"


def test_image_batches_and_non_causal_latents_stream_too(load_vae, decode, stream_of, to_images):
    sd, z = load_vae("sd"), latent((3, 4, 8, 10), 22)  # 3 batch items
    assert torch.equal(to_images(stream_of(z, sd, frames_per_batch=2)), decode(z, sd, 64, 16))
    assert torch.equal(to_images(stream_of(z, sd, devices="cpu:2", frames_per_batch=2)),
                       decode(z, sd, 64, 16, devices="cpu:2"))


def test_a_stream_consumed_twice_decodes_twice_and_gives_the_same_frames(load_vae, stream_of, to_images, decodes):
    wan, z = load_vae("wan21"), latent((1, 16, 2, 8, 8), 23)
    stream = stream_of(z, wan)
    first = to_images(stream)
    report = decodes.last
    second = to_images(stream)
    assert decodes.last is not report and len(decodes.last.units) == len(report.units) > 0, \
        "the second consumer ran its own decode"
    assert torch.equal(first, second)


def test_png_sequence_holds_the_decode_nodes_frames_in_8_bit(load_vae, decode, stream_of, save):
    wan, z = load_vae("wan21"), latent((1, 16, 3, 8, 10), 24)
    expected = decode(z, wan, 64, 16)
    out, files = save(stream_of(z, wan, frames_per_batch=4), "png")
    assert len(files) == expected.shape[0] == 9
    want = np.clip(255.0 * expected.numpy(), 0, 255).astype(np.uint8)  # SaveImage's conversion
    for i, f in enumerate(files):
        assert np.array_equal(read_png(f), want[i]), f"frame {i}"
    video = out.result[0]
    assert video.get_frame_count() == 9 and video.get_dimensions() == (80, 64)
    assert torch.equal(video.get_components().images, torch.from_numpy(want).float() / 255.0)


@pytest.mark.parametrize("fmt,codec", [("mp4", "h264"), ("webm", "vp9")])
def test_mp4_and_webm_decode_back_with_the_right_frame_count_and_size(load_vae, stream_of, save, fmt, codec):
    wan, z = load_vae("wan21"), latent((1, 16, 3, 8, 10), 25)
    out, files = save(stream_of(z, wan, frames_per_batch=4), fmt, fps=12.0)
    assert len(files) == 1 and files[0].suffix == f".{fmt}" and out.ui["animated"] == (True,)
    with av.open(str(files[0])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == codec
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert "prompt" in {k.lower() for k in container.metadata}  # matroska upper-cases tags
    assert len(frames) == 9 and frames[0].shape == (64, 80, 3)
    assert float(stream.average_rate) == pytest.approx(12.0)
    assert out.result[0].get_dimensions() == (80, 64)


def test_saving_twice_counts_up_like_save_image(load_vae, stream_of, save):
    wan, z = load_vae("wan21"), latent((1, 16, 1, 8, 8), 26)
    _, a = save(stream_of(z, wan), "mp4")
    _, b = save(stream_of(z, wan), "mp4")
    assert a[0].name == "clip_00001_.mp4" and b[0].name == "clip_00002_.mp4"


@pytest.mark.parametrize("devices,fmt", [("cpu", "png"), ("cpu:2", "png"), ("cpu:2", "mp4")])
def test_interrupt_mid_stream_stops_within_2s_removes_the_partial_files_and_next_save_works(
        load_vae, stream_of, save, nodes, devices, fmt, tmp_path, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    wan, z = load_vae("wan21"), latent((1, 16, 8, 16, 16), 27)  # 29 frames, 4 tiles x 8 steps
    stream = stream_of(z, wan, tile_size=64, overlap=16, devices=devices, frames_per_batch=4)
    pressed, units = {}, []
    # ComfyUI's progress bar advances once per unit decoded (the node's bar is made when it runs)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, *a, **k: units.append(value))

    def press():
        # png: as soon as the first frame file exists. mp4: H.264 holds frames back (lookahead), so
        # the file may not exist yet; press once 8 of the 32 units are decoded (not a clock: a warm,
        # quiet machine may decode all 29 frames in a few seconds).
        while not (list(tmp_path.rglob("*.png")) if fmt == "png" else max(units, default=0) >= 8):
            time.sleep(0.02)
        pressed["at"] = time.monotonic()
        mm.interrupt_current_processing(True)

    threading.Thread(target=press, daemon=True).start()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            save(stream, fmt, audio=sound.tone(16000, 3.0))  # png: a FLAC file too
    finally:
        mm.interrupt_current_processing(False)  # a missed interrupt must not stop the next test
    assert time.monotonic() - pressed["at"] < 2.0
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "the partial files (and the sound's) are removed"
    assert not [t for t in threading.enumerate() if t.name == "pvae-stream"], "the decode thread has stopped"
    pool = nodes.backends.local_pool() if devices != "cpu" else None
    pids = pool.pids() if pool else None
    small = latent((1, 16, 2, 8, 8), 28)
    _, files = save(stream_of(small, wan, devices=devices), fmt)
    assert files and all(f.exists() for f in files)
    if pool:
        assert nodes.backends.local_pool().pids() == pids, "the same workers served the next prompt"


def test_bad_input_is_named(load_vae, stream_of, nodes, save):
    stream_node, save_node = nodes.ParallelVAEDecodeStream, nodes.ParallelVAESaveVideo
    assert "frames_per_batch" in stream_node.validate_inputs(64, 16, 64, 8, "auto", 0)
    assert stream_node.validate_inputs(64, 16, 64, 8, "auto", 1) is True
    assert "format: 'gif' is not one of mp4, webm, png" in save_node.validate_inputs("x", 16.0, "gif", 19)
    for fps in (0.0, -1.0):
        assert save_node.validate_inputs("x", fps, "mp4", 19).startswith("fps:")
    assert save_node.validate_inputs("x", 16.0, "mp4", 60).startswith("crf:")
    msg = save_node.validate_inputs("../../escape", 16.0, "mp4", 19)
    assert msg.startswith("filename_prefix:") and "outside ComfyUI's output folder" in msg
    assert save_node.validate_inputs("ok/name", 16.0, "webm", 60) is True

    wan, z = load_vae("wan21"), latent((1, 16, 1, 8, 8), 29)
    with pytest.raises(ValueError, match="frames_per_batch"):
        stream_of(z, wan, frames_per_batch=0)
    with pytest.raises(ValueError, match="filename_prefix"):
        save(stream_of(z, wan), "mp4", prefix="../../escape")
    with pytest.raises(ValueError, match="fps"):
        save(stream_of(z, wan), "mp4", fps=0.0)
    with pytest.raises(ValueError, match="expected the output of Parallel Tiled VAE Decode"):
        save(torch.zeros(1), "mp4")


def test_the_stream_nodes_recipe_starts_no_worker(load_vae, stream_of, to_images, nodes):
    """The stream node only checks its inputs: the workers start when a consumer pulls frames."""
    nodes.backends.shutdown()
    wan, z = load_vae("wan21"), latent((1, 16, 2, 8, 8), 31)
    stream = stream_of(z, wan, devices="cpu:2")
    assert nodes.backends.local_pool() is None and procs.workers_of(os.getpid()) == []
    assert to_images(stream).shape == (5, 64, 64, 3)
    assert len(procs.workers_of(os.getpid())) == 2


def test_a_worker_with_less_work_is_held_within_a_few_frames_of_the_others(load_vae, decode, stream_of, to_images,
                                                                            nodes, decodes):
    from parallel_vae.jobs import LOOKAHEAD_STEPS, SLOTS

    wan, z = load_vae("wan21"), latent((1, 16, 24, 8, 20), 30)  # 3 equal tiles in a row, 24 latent frames
    stream = stream_of(z, wan, devices="cpu:2", frames_per_batch=8)
    held = nodes.backends.backend_for(stream.job.devices).pool.stats.held
    out = to_images(stream)  # two workers: one decodes two tiles, the other one tile (twice as fast)
    delivered = {t: 0 for t, *_ in decodes.last.units}
    assert len(delivered) == 3
    lead = 0
    for tile, step, lane, pid in decodes.last.units:  # in the order they reached the blender
        delivered[tile] = step + 1
        lead = max(lead, max(delivered.values()) - min(delivered.values()))
    assert lead <= LOOKAHEAD_STEPS + SLOTS + 1, f"a worker ran {lead} frames ahead"
    assert nodes.backends.local_pool().stats.held > held, "the faster worker was held back"
    assert torch.equal(out, decode(z, wan, 64, 16, devices="cpu:2"))
