"""Worker processes behind a real ComfyUI server: tiles on every worker, progress per device,
no worker outliving ComfyUI however it stops, and a 25-prompt soak."""
from __future__ import annotations

import os
import signal
import time

import pytest

from testkit.prompts import decode_prompt
from testkit.procs import alive, workers_of
from testkit.server import saved_images


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_tiles_spread_over_workers_with_progress_per_device(server, put_latent):
    put_latent("sd_workers.latent", (2, 4, 10, 14), seed=31)
    core = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}
    run = server.run(decode_prompt("sd", "sd_workers.latent", core, tile_size=64, overlap=16, devices="cpu:2"))
    assert run.ok, (run.error, server.log_tail())
    ours, ref = saved_images(server, run, "4"), saved_images(server, run, "6")
    assert ours.shape == ref.shape and abs(ours - ref).max() <= 1
    last = run.progress_texts("3")[-1]
    counts = dict(part.rsplit(" ", 1) for part in last.split(" (")[0].split(", "))
    assert set(counts) == {"cpu[0]", "cpu[1]"}, last
    done = [int(c.split("/")[0]) for c in counts.values()]
    assert sum(done) == 28 and all(d > 0 for d in done), last
    assert len(workers_of(server.proc.pid)) == 2


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.every_runtime), signal.SIGKILL])
def test_no_worker_outlives_comfyui(own_server, put_latent_to, sig):
    server = own_server.start()
    put_latent_to(server, "sd_small.latent", (1, 4, 8, 8), seed=32)
    run = server.run(decode_prompt("sd", "sd_small.latent", tile_size=64, overlap=16, devices="cpu:2"))
    assert run.ok, (run.error, server.log_tail())
    pids = workers_of(server.proc.pid)
    assert len(pids) == 2
    os.kill(server.proc.pid, sig)
    server.proc.wait(30)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], f"workers left behind after {sig.name}"


def test_soak_15_prompts_constant_workers_and_server_memory(server, put_latent):
    """The short soak of make test (the 100-prompt one with /free is `make soak`)."""
    put_latent("soak.latent", (1, 4, 12, 12), seed=33)
    prompt = decode_prompt("sd", "soak.latent", tile_size=64, overlap=16, devices="cpu:2")
    prompt["7"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["2", 0], "multiplier": 1.0}}
    prompt["3"]["inputs"]["samples"] = ["7", 0]
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    pid = server.proc.pid
    rss, pids = [], []
    for i in range(15):
        prompt["7"]["inputs"]["multiplier"] = 1.0 + i / 100  # a new input each time: nothing is cached
        run = server.run(prompt)
        assert run.ok, (i, run.error, server.log_tail())
        pids.append(tuple(workers_of(pid)))
        rss.append(rss_kib(pid))
    assert len(set(pids)) == 1 and len(pids[0]) == 2, "the same two workers served every prompt"
    growth = rss[-1] / rss[5] - 1  # after warm-up
    print(f"server RSS after prompt 6: {rss[5] / 1024:.0f} MiB, after 15: {rss[-1] / 1024:.0f} MiB "
          f"({growth:+.2%})")
    assert growth < 0.05


def test_wan_on_two_workers_equals_vae_decode_tiled_and_a_worker_killed_mid_decode_changes_nothing(server,
                                                                                                     put_latent):
    """Time uncut (VAE Decode (Tiled) with a temporal tile covering every frame), then the same decode
    with one worker SIGKILLed after the first tile-step: its tiles restart on the other worker and on
    its replacement, and the saved frames are the same."""
    put_latent("wan_workers.latent", (1, 16, 4, 12, 12), seed=34)  # 13 frames of 96 x 96, 4 causal tiles
    core = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}
    prompt = decode_prompt("wan21", "wan_workers.latent", core, tile_size=64, overlap=16, devices="cpu:2")
    run = server.run(prompt)
    assert run.ok, (run.error, server.log_tail())
    first, ref = saved_images(server, run, "4"), saved_images(server, run, "6")
    assert first.shape == ref.shape == (13, 96, 96, 3) and abs(first - ref).max() <= 1

    # a new input for the decode node (the same latent through LatentMultiply x1), so it runs again
    again = decode_prompt("wan21", "wan_workers.latent", tile_size=64, overlap=16, devices="cpu:2")
    again["7"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["2", 0], "multiplier": 1.0}}
    again["3"]["inputs"]["samples"] = ["7", 0]
    again["4"]["inputs"]["filename_prefix"] += "_killed"
    killed = []

    def kill_a_worker(msg):
        if not killed and msg.get("type") == "progress" and msg["data"].get("node") == "3":
            victim = workers_of(server.proc.pid)[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    run = server.run(again, on_message=kill_a_worker)
    assert killed and run.ok, (run.error, server.log_tail())
    assert (saved_images(server, run, "4") == first).all(), "the same frames with a worker killed mid-decode"
    workers = workers_of(server.proc.pid)
    assert len(workers) == 2 and killed[0] not in workers, "the killed worker was replaced"
