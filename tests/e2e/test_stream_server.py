"""The stream nodes behind a real ComfyUI server, driven by API prompt JSON over HTTP and the
websocket: exact PNG sequences, playable mp4, live previews and events, interrupt, bad input."""
from __future__ import annotations

import pytest

import json
import time

import av
import numpy as np

from testkit import random_vaes, sound
from testkit.latents import read_png
from testkit.procs import workers_of
from testkit.prompts import decode_prompt, video_prompt
from testkit.server import saved_images


WAN = random_vaes.vae_filename("wan21")
SMALL = dict(tile_size=64, overlap=16, frames_per_batch=4)


def saved_files(server, run, node_id):
    return [server.base / "output" / f["subfolder"] / f["filename"] for f in run.outputs(node_id)["images"]]


def events(run, name, node="3"):
    return [m for m in run.of_type(f"parallel_vae.{name}") if m["data"]["node"] == node]


def previews(run, node="3"):
    """Binary preview frames (type 4, with metadata) addressed to ``node``."""
    found = []
    for m in run.of_type("binary"):
        if m["event"] == 4:
            n = int.from_bytes(m["payload"][:4], "big")
            meta = json.loads(m["payload"][4:4 + n])
            if meta["node_id"] == node:
                found.append((m["t"], m["payload"][4 + n:]))
    return found


def executed_at(run, node):
    return next(m["t"] for m in run.of_type("executed") if m["data"]["node"] == node)


@pytest.mark.every_runtime
def test_png_sequence_equals_parallel_decode_frame_for_frame_with_live_previews_and_events(server, put_latent):
    z = put_latent("stream_png.latent", (1, 16, 3, 12, 12), 31)  # 9 frames of 96 x 96, 4 tiles
    prompt = video_prompt(WAN, "stream_png.latent", "e2e/stream_png/video", format="png", devices="cpu:2", **SMALL)
    prompt["5"] = {"class_type": "ParallelVAEDecode",
                   "inputs": {"samples": ["2", 0], "vae": ["1", 0], "tile_size": 64, "overlap": 16,
                              "temporal_size": 64, "temporal_overlap": 8, "devices": "cpu:2", "mode": "tiled"}}
    # (the same devices as the stream: one CPU thread per worker sums in another order than two)
    prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "e2e/stream_png/img"}}
    # Tiles are pulled: a worker still loading the VAE rightly gets none of a small job. So warm-up
    # prompts first, until both workers hold it; then each pulls a tile group at once.
    put_latent("stream_warm.latent", (1, 16, 1, 8, 8), 30)
    server.warm_workers(decode_prompt("wan21", "stream_warm.latent", devices="cpu:2"), 2)
    run = server.run(prompt)
    assert run.ok, run.error or run.response
    frames = saved_files(server, run, "4")
    assert len(frames) == 9 == z.shape[2] * 4 - 3
    stream = np.stack([read_png(f) for f in frames])
    assert np.array_equal(stream, saved_images(server, run, "6")), "8-bit identical to the decode node"

    finished = executed_at(run, "4")
    shown = previews(run)
    assert len(shown) >= 2 and shown[0][0] < finished, "preview frames arrived while the stream decoded"
    assert all(jpeg[:2] == b"\xff\xd8" for _, jpeg in shown), "JPEG previews"
    plan, progress, done = events(run, "plan"), events(run, "progress"), events(run, "done")
    assert len(plan) == 1 and len(done) == 1 and progress
    assert plan[0]["t"] < progress[0]["t"] <= done[0]["t"] < finished, "events before the node finished"
    assert plan[0]["data"]["lanes"] == ["cpu[0]", "cpu[1]"] and len(plan[0]["data"]["tiles"]) == 4
    assert plan[0]["data"]["prompt_id"] == run.prompt_id
    assert sum(done[0]["data"]["done"].values()) == plan[0]["data"]["units"] == 4 * 3
    assert all(n > 0 for n in done[0]["data"]["done"].values()), "both workers decoded tiles"
    assert previews(run, "5"), "the plain decode node previews too"


def test_mp4_is_listed_for_the_editor_and_plays_back(server, put_latent):
    put_latent("stream_mp4.latent", (1, 16, 3, 12, 16), 32)
    run = server.run(video_prompt(WAN, "stream_mp4.latent", "e2e/stream_mp4/video", format="mp4", **SMALL))
    assert run.ok, run.error or run.response
    ui = run.outputs("4")
    assert ui["animated"] == [True] and len(ui["images"]) == 1
    entry = ui["images"][0]
    assert entry["type"] == "output" and entry["filename"].endswith(".mp4")
    r = server.get("/view", params={"filename": entry["filename"], "subfolder": entry["subfolder"], "type": "output"})
    assert r.status_code == 200 and len(r.content) > 0
    with av.open(str(saved_files(server, run, "4")[0])) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 9 and decoded[0].shape == (96, 128, 3)


def test_interrupt_mid_stream_stops_within_2s_leaves_no_file_and_workers_serve_the_next_prompt(server, put_latent):
    put_latent("stream_stop.latent", (1, 16, 10, 16, 16), 33)  # 37 frames
    prompt = video_prompt(WAN, "stream_stop.latent", "e2e/stream_stop/video", format="png", devices="cpu:2", **SMALL)
    pressed = {}

    def on_message(msg):
        if msg["type"] == "binary" and msg["event"] == 4 and "at" not in pressed:
            pressed["at"] = time.monotonic()  # the first frame is on screen: press cancel
            server.post("/interrupt", {})

    run = server.run(prompt, on_message=on_message)
    stopped = run.of_type("execution_interrupted")
    assert "at" in pressed and stopped, run.error
    assert stopped[0]["t"] - pressed["at"] < 2.0
    assert stopped[0]["data"]["node_id"] == "4"
    folder = server.base / "output" / "e2e" / "stream_stop"
    assert not list(folder.glob("*")) if folder.exists() else True, "no partial frames left behind"
    pids = workers_of(server.proc.pid)
    assert len(pids) == 2

    prompt["4"]["inputs"]["fps"] = 15.0  # a different prompt, so ComfyUI does not answer from its cache
    again = server.run(prompt)
    assert again.ok, again.error
    assert len(saved_files(server, again, "4")) == 37
    assert workers_of(server.proc.pid) == pids, "the same workers served the next prompt"


@pytest.mark.every_runtime
def test_bad_stream_and_save_inputs_are_named_and_the_server_keeps_serving(server, put_latent):
    put_latent("stream_bad.latent", (1, 16, 1, 8, 8), 34)
    cases = {"frames_per_batch": 0, "format": "gif", "fps": 0.0, "filename_prefix": "../../outside"}
    for key, value in cases.items():
        r = server.queue(video_prompt(WAN, "stream_bad.latent", "e2e/stream_bad/video", **{key: value}))
        assert r.status_code == 400, (key, r.text)
        errors = r.json()["node_errors"]
        # ComfyUI files the node's message under each of the node's inputs ("<input> - <message>"):
        # one message, and it names the bad input first
        messages = {e["details"].split(" - ", 1)[-1] for node in errors.values() for e in node["errors"]}
        assert len(messages) == 1 and next(iter(messages)).startswith(f"{key}: "), (key, messages)
    ok = server.run(video_prompt(WAN, "stream_bad.latent", "e2e/stream_bad/video", **SMALL))
    assert ok.ok, ok.error


def core_save_video(server, video_from: list, prefix: str) -> dict:
    """ComfyUI's own Save Video node, as mp4/h264 re-encoded at crf 20 where this ComfyUI offers
    that (0.3x+: its format is a dynamic combo whose options carry codec and encoding inputs, and it
    passes crf and color_space to the video's save_to); plain mp4/h264 on older ones."""
    info = server.object_info("SaveVideo")["SaveVideo"]["input"]["required"]
    inputs = {"video": video_from, "filename_prefix": prefix}
    if info["format"][0] == "COMFY_DYNAMICCOMBO_V3":
        inputs.update({"format": "mp4", "format.codec": "h264", "format.codec.encoding": "re-encode",
                       "format.codec.encoding.crf": 20.0, "format.codec.encoding.color_space": "sRGB"})
    else:
        inputs.update({"format": "mp4", "codec": "h264"})
    return {"class_type": "SaveVideo", "inputs": inputs}


@pytest.mark.every_runtime
def test_the_video_output_feeds_comfyuis_own_save_video_for_mp4_and_png(server, put_latent):
    """With sound from core's Load Audio: our file has it, and core's Save Video keeps it."""
    put_latent("stream_core.latent", (1, 16, 2, 8, 8), 35)  # 5 frames of 64 x 64
    sound.write_flac(server.base / "input" / "tone.flac", sound.tone(44100, 3.0))
    for fmt in ("mp4", "png"):
        prompt = video_prompt(WAN, "stream_core.latent", f"e2e/core_{fmt}/ours", format=fmt, **SMALL)
        prompt["6"] = {"class_type": "LoadAudio", "inputs": {"audio": "tone.flac"}}
        prompt["4"]["inputs"]["audio"] = ["6", 0]
        prompt["5"] = core_save_video(server, ["4", 0], f"e2e/core_{fmt}/core")
        run = server.run(prompt)
        assert run.ok, (fmt, run.error, server.log_tail())
        saved = run.outputs("5")
        entry = (saved.get("images") or saved.get("videos") or saved.get("video"))[0]
        path = server.base / "output" / entry["subfolder"] / entry["filename"]
        with av.open(str(path)) as f:
            stream = f.streams.video[0]
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (64, 64, 3), fmt
        assert stream.codec_context.name == "h264", fmt
        ours = run.outputs("4").get("audio") or run.outputs("4")["images"]
        ours_path = server.base / "output" / ours[0]["subfolder"] / ours[0]["filename"]
        for where in (ours_path, path):  # ours: AAC in the mp4 or the FLAC; core's: AAC
            samples, rate, codec = sound.read(where)
            assert samples.shape[0] == 2 and abs(samples.shape[1] / rate - 5 / 16) <= 1 / 16, (fmt, where.name)
            assert codec == ("flac" if where.suffix == ".flac" else "aac"), (fmt, where.name)
        ours = saved_files(server, run, "4")
        first = read_png(ours[0]) if fmt == "png" else None
        if first is not None:  # the frames went through: lossy h264 of our lossless first frame
            assert np.abs(frames[0].astype(np.int16) - first).mean() < 12
