"""ParallelVAEDecode on worker processes (cpu:N) with ComfyUI's real VAEs: equality with
VAEDecodeTiled for any number of workers, persistence across prompts, faults and interrupt."""
from __future__ import annotations

import os
import time

import pytest

from testkit import faults, interrupt
from testkit.compare import TOL, latent, max_diff
from testkit.procs import before_sending, sigkill


@pytest.fixture(scope="module")
def backends(pack):
    yield pack.nodes.backends
    pack.nodes.backends.shutdown()


@pytest.mark.parametrize("devices", ["cpu:2", "cpu:3"])
def test_sd_and_wan_equal_vae_decode_tiled_on_any_number_of_workers(load_vae, decode, core_tiled, backends, hold_vae,
                                                                    decodes, devices):
    n = int(devices.split(":")[1])
    sd, z = load_vae("sd"), latent((2, 4, 10, 14), 11)
    assert max_diff(decode(z, sd, 64, 16, devices=devices), core_tiled(z, sd, 64, 16)) <= TOL
    pids = set(backends.local_pool().pids().values())
    assert len(pids) == n and os.getpid() not in pids
    assert decodes.last.pids() <= pids, "none ran in ComfyUI's process"
    hold_vae(backends.local_pool(), sd)  # tiles are pulled: a worker still loading gets none
    decode(latent((1, 4, 10, 14), 10), sd, 64, 16, devices=devices)  # 6 tiles
    assert decodes.last.pids() == pids, "every worker that holds the VAE pulls a tile at once"

    wan, v = load_vae("wan21"), latent((1, 16, 3, 10, 14), 12)
    ours = decode(v, wan, 64, 16, 8, 4, devices=devices)  # causal: time is never cut
    assert max_diff(ours, core_tiled(v, wan, 64, 16, 64, 8)) <= TOL
    lanes_per_tile = {}
    for tile, step, lane, pid in decodes.last.units:
        lanes_per_tile.setdefault(tile, set()).add(pid)
    assert all(len(p) == 1 for p in lanes_per_tile.values()), "a causal tile stays in one worker (sticky)"


def test_second_prompt_uses_the_same_workers_and_sends_no_weights(load_vae, decode, backends, decodes, hold_vae):
    vae = load_vae("sd")
    decode(latent((1, 4, 10, 10), 13), vae, 64, 16, devices="cpu:2")
    pool = backends.local_pool()
    hold_vae(pool, vae)
    pids, sent, loads = pool.pids(), pool.stats.weights_bytes, pool.stats.loads
    assert sent > 0 and loads >= 2
    decode(latent((1, 4, 12, 10), 14), vae, 64, 16, devices="cpu:2")
    assert backends.local_pool() is pool and pool.pids() == pids
    assert decodes.last.pids() == set(pids.values())
    assert (pool.stats.weights_bytes, pool.stats.loads) == (sent, loads), "no weights the second time"


def test_a_different_vae_is_shipped_once_and_both_stay_cached(load_vae, decode, core_tiled, backends):
    sd, flux = load_vae("sd"), load_vae("flux")
    z4, z16 = latent((1, 4, 10, 10), 15), latent((1, 16, 8, 8), 16)
    decode(z4, sd, 64, 16, devices="cpu:2")
    pool = backends.local_pool()
    assert max_diff(decode(z16, flux, 64, 16, devices="cpu:2"), core_tiled(z16, flux, 64, 16)) <= TOL
    sent = pool.stats.weights_bytes
    assert max_diff(decode(z4, sd, 64, 16, devices="cpu:2"), core_tiled(z4, sd, 64, 16)) <= TOL
    assert pool.stats.weights_bytes == sent, "two VAEs fit in each worker's cache"


@pytest.mark.parametrize("family, shape", [("sd", (1, 4, 16, 16)), ("wan21", (1, 16, 3, 12, 12))])
def test_sigkill_of_a_worker_mid_job_gives_the_same_output_and_a_full_pool(load_vae, decode, core_tiled, backends,
                                                                           hold_vae, source_of, family, shape):
    vae, z = load_vae(family), latent(shape, 17)
    decode(latent(shape, 18), vae, 64, 16, devices="cpu:2")
    pool = backends.local_pool()
    hold_vae(pool, vae)  # both hold the VAE: each pulls a tile at once
    victim = pool.pids()["cpu[1]"]
    restarts = pool.stats.restarts
    killed = before_sending(pool, "cpu[1]", "Task", sigkill)  # dies holding a tile
    ours = decode(z, vae, 64, 16, devices="cpu:2")
    assert killed.is_set(), "the worker never got a task"
    assert pool.stats.restarts == restarts + 1
    assert max_diff(ours, core_tiled(z, vae, 64, 16, 64, 8)) <= TOL
    ready = pool.wait_ready(source_of(vae))
    assert len(ready) == 2 and victim not in ready.values()


def test_interrupt_mid_decode_returns_within_2_s_and_the_next_prompt_succeeds(comfy, load_vae, decode,
                                                                              core_tiled, backends, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    vae = load_vae("sd")
    decode(latent((1, 4, 8, 8), 19), vae, 64, 16, devices="cpu:2")  # warm
    z = latent((1, 4, 48, 48), 20)  # ~100 tiles: tens of seconds on two CPU workers
    units = []  # ComfyUI's progress bar advances once per unit decoded
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, *a, **k: units.append(value))
    press = interrupt.Press(lambda: max(units, default=0) >= 2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            decode(z, vae, 64, 16, devices="cpu:2")
        returned = time.monotonic() - press.at
    finally:
        press.stop()
    assert returned < 2.0, f"returned {returned:.2f} s after the interrupt"
    assert max(units) < 50, "it stopped long before the end"
    small = latent((1, 4, 10, 10), 21)
    assert max_diff(decode(small, vae, 64, 16, devices="cpu:2"), core_tiled(small, vae, 64, 16)) <= TOL


def test_a_worker_that_crashes_on_start_is_a_clear_node_error(load_vae, decode, backends, monkeypatch):
    from parallel_tiled_vae.parallel_vae.errors import DecodeError

    backends.shutdown()
    faults.enable(monkeypatch, "start")
    with pytest.raises(DecodeError, match=r"no decode worker could run \(cpu\[0\]: could not start: .*fails on start"):
        decode(latent((1, 4, 8, 8), 22), load_vae("sd"), 64, 16, devices="cpu:2")
    backends.shutdown()
    monkeypatch.delenv(faults.FAULT_ENV)
    decode(latent((1, 4, 8, 8), 22), load_vae("sd"), 64, 16, devices="cpu:2")


def test_changing_the_device_list_replaces_the_workers(load_vae, decode, core_tiled, backends):
    vae, z = load_vae("sd"), latent((1, 4, 8, 10), 23)
    decode(z, vae, 64, 16, devices="cpu:2")
    old = list(backends.local_pool().pids().values())
    one = decode(z, vae, 64, 16, devices="cpu:1")  # one worker process, not ComfyUI's own CPU
    assert max_diff(one, core_tiled(z, vae, 64, 16)) <= TOL
    assert len(backends.local_pool().pids()) == 1 and os.getpid() not in backends.local_pool().pids().values()
    for pid in old:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_hangs_mid_job_is_stopped_and_its_tiles_requeued(load_vae, decode, core_tiled, backends,
                                                                      source_of, monkeypatch, tmp_path):
    """The fault hook makes cpu[1] hang (alive, silent) on its first tile, once; with a 3 s unit
    deadline the watchdog kills it, the tile is decoded elsewhere, the output is unchanged, the
    prompt ends in bounded time, and the pool is back to two workers."""
    from parallel_tiled_vae.parallel_vae.watchdog import UNIT_TIMEOUT_ENV

    vae, z = load_vae("sd"), latent((1, 4, 12, 14), 44)
    backends.shutdown()
    faults.enable(monkeypatch, f"hang:*:cpu[1]:{tmp_path / 'hung'}")
    monkeypatch.setenv(UNIT_TIMEOUT_ENV, "3")
    try:
        started = time.monotonic()
        ours = decode(z, vae, 64, 16, devices="cpu:2")  # cpu[1] hangs on its first tile, once
        assert time.monotonic() - started < 60
        pool = backends.local_pool()
        assert (tmp_path / "hung").exists(), "the fault hook never fired"
        assert any("silent" in text for _, text in pool.stats.events), pool.stats.events
        assert max_diff(ours, core_tiled(z, vae, 64, 16, 64, 8)) <= TOL
        ready = pool.wait_ready(source_of(vae))
        assert len(ready) == 2
    finally:
        backends.shutdown()
