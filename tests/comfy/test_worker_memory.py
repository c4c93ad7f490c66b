"""Idle workers give memory back: after PARALLEL_VAE_IDLE_DROP_S they forget their VAEs (and say
what they still hold), after PARALLEL_VAE_IDLE_EXIT_S they exit; the next decode brings them back
with the same output. Releasing the pool (what ComfyUI's /free does) waits for a running decode."""
from __future__ import annotations

import threading
import time

import torch

from testkit.compare import latent
from testkit.procs import alive


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {seconds} s")


def test_idle_workers_drop_their_vaes_then_exit_and_come_back(pack, load_vae, decode, decodes, monkeypatch):
    backends = pack.nodes.backends
    pool_module = pack.parallel_vae.pool
    backends.shutdown()
    monkeypatch.setenv(pool_module.IDLE_DROP_ENV, "1")
    monkeypatch.setenv(pool_module.IDLE_EXIT_ENV, "6")
    monkeypatch.setattr(pool_module, "TIDY_EVERY_S", 0.2)
    try:
        vae, z = load_vae("sd"), latent((1, 4, 10, 12), 41)
        first = decode(z, vae, 64, 16, devices="cpu:2")
        rows = backends.report()["workers"]
        pids = [r["pid"] for r in rows]
        assert [r["models"] for r in rows] == [1, 1], rows

        def dropped():
            now = backends.report()
            return now["workers"] if all(r["models"] == 0 and r["state"] == "up" for r in now["workers"]) else None
        rows = wait_for(dropped, 8, "dropping the VAEs")
        assert [r["pid"] for r in rows] == pids, "dropping keeps the processes"
        assert all(r["held_mib"] > 0 for r in rows), rows  # each said what it still holds

        # The janitor reaps the processes, then marks their handles: the route may briefly lag.
        def exited():
            states = [r["state"] for r in backends.report()["workers"]]
            return states if not any(alive(p) for p in pids) and states == ["dead", "dead"] else None
        wait_for(exited, 12, "the idle exit")

        again = decode(z, vae, 64, 16, devices="cpu:2")
        assert torch.equal(again, first)
        assert not decodes.last.pids() & set(pids), "new workers"
    finally:
        backends.shutdown()


def test_release_waits_for_the_running_decode_then_stops_every_worker(pack, load_vae, decode):
    backends = pack.nodes.backends
    vae = load_vae("sd")
    decode(latent((1, 4, 8, 8), 42), vae, 64, 16, devices="cpu:2")  # warm
    z = latent((1, 4, 24, 24), 43)  # several seconds on two workers
    result = {}
    runner = threading.Thread(target=lambda: result.update(out=decode(z, vae, 64, 16, devices="cpu:2")))
    try:
        runner.start()
        time.sleep(1.0)
        pids = list(backends.local_pool().pids().values())
        assert runner.is_alive(), "the decode should still be running"
        assert backends.release("a test") == 2
        assert not any(alive(p) for p in pids)
        runner.join(10)
        assert result["out"].shape[1:3] == (192, 192), "the running decode finished undisturbed"
    finally:
        runner.join(60)
        backends.shutdown()
