"""Workers give memory back inside a real server: "Free model and node cache" (POST /free)
stops them, the /parallel_vae/workers route shows them and its stop route stops them, and the
next prompt brings them back with the same output."""
from __future__ import annotations

import time

import pytest

from testkit.prompts import decode_prompt
from testkit.procs import alive, workers_of
from testkit.server import saved_images


def wait_gone(pids, seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.every_runtime
def test_free_stops_the_workers_and_the_next_prompt_brings_them_back(server, put_latent):
    put_latent("sd_free.latent", (1, 4, 10, 12), seed=61)
    prompt = decode_prompt("sd", "sd_free.latent", tile_size=64, overlap=16, devices="cpu:2")
    first = server.run(prompt)
    assert first.ok, (first.error, server.log_tail())
    before = saved_images(server, first, "4")
    shown = server.get("/parallel_vae/workers").json()
    assert shown["devices"] == ["cpu[0]", "cpu[1]"], shown
    rows = shown["workers"]
    assert [r["state"] for r in rows] == ["up", "up"] and all(r["models"] == 1 for r in rows), rows
    assert all(r["rss_mib"] > 0 for r in rows), rows
    pids = workers_of(server.proc.pid)
    assert sorted(pids) == sorted(r["pid"] for r in rows)

    started = time.monotonic()
    # what the "Free model and node cache" button posts (free_memory also empties ComfyUI's cache,
    # so the same prompt decodes again)
    assert server.post("/free", {"unload_models": True, "free_memory": True}).status_code == 200
    assert not wait_gone(pids), "workers still running after POST /free"
    print(f"workers gone {time.monotonic() - started:.2f} s after POST /free")
    deadline = time.monotonic() + 5  # the processes are gone a moment before the pool marks them
    states = lambda: [r["state"] for r in server.get("/parallel_vae/workers").json()["workers"]]  # noqa: E731
    while states() != ["dead", "dead"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert states() == ["dead", "dead"]

    again = server.run(prompt)
    assert again.ok, (again.error, server.log_tail())
    assert (saved_images(server, again, "4") == before).all()
    back = workers_of(server.proc.pid)
    assert len(back) == 2 and not set(back) & set(pids)

    assert server.post("/free", {"free_memory": False, "unload_models": False}).status_code == 200
    time.sleep(1.0)
    assert sorted(workers_of(server.proc.pid)) == sorted(back), "a /free that frees nothing stops nothing"


def test_the_stop_route_stops_the_workers(server, put_latent):
    put_latent("sd_stop.latent", (1, 4, 8, 8), seed=62)
    run = server.run(decode_prompt("sd", "sd_stop.latent", tile_size=64, overlap=16, devices="cpu:2"))
    assert run.ok, (run.error, server.log_tail())
    pids = workers_of(server.proc.pid)
    assert len(pids) == 2
    answer = server.post("/api/parallel_vae/workers/stop", {})
    assert answer.status_code == 200 and answer.json() == {"stopped": 2}
    assert not wait_gone(pids, 2), "the stop route returns once the workers are gone"
