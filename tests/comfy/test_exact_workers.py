"""Exact mode on worker processes (cpu:N): equal to the untiled VAE Decode, bit for bit the same as
in ComfyUI's process at the workers' thread count whatever the number of workers, and unchanged by
a worker killed mid lock-step, an out-of-memory band, or an interrupt."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from testkit import faults, interrupt
from testkit.compare import TOL, latent, max_diff
from testkit.procs import before_sending, sigkill
from testkit.speeds import even_speeds

SD_Z = (2, 4, 21, 14)
WAN_Z = (1, 16, 3, 32, 4)  # two bands of 16 rows at tile_size 64 (which caps a band there) and even speeds


@pytest.fixture(scope="module")
def backends(pack):
    yield pack.nodes.backends
    pack.nodes.backends.shutdown()


def worker_threads(pack, devices: str) -> int:
    return pack.nodes.backends.worker_specs(pack.parallel_vae.devices.parse(devices))[0].threads


def test_sd_exact_on_two_and_three_workers_equals_untiled_and_in_process_bit_for_bit(
        pack, load_vae, decode, core_decode, backends, decodes, torch_threads):
    vae, z = load_vae("sd"), latent(SD_Z, 3)
    two = decode(z, vae, 96, 16, devices="cpu:2", mode="exact")  # 3 bands per item: groups of 2 and 1
    pids_two = decodes.last.pids()
    three = decode(z, vae, 96, 16, devices="cpu:3", mode="exact")  # one band per worker
    assert len(pids_two) == 2 and len(decodes.last.pids()) == 3
    assert max_diff(two, core_decode(z, vae)) <= TOL
    assert torch.equal(two, three)
    assert worker_threads(pack, "cpu:2") == worker_threads(pack, "cpu:3")
    torch_threads(worker_threads(pack, "cpu:3"))
    assert torch.equal(three, decode(z, vae, 512, 16, devices="cpu", mode="exact")), "one band in-process"


def test_wan_exact_on_two_workers_equals_untiled_and_streams_in_frame_order(
        pack, load_vae, decode, core_decode, stream_of, to_images, backends, decodes, torch_threads):
    vae, z = load_vae("wan21"), latent(WAN_Z, 5)
    even_speeds(backends.local_pool())
    ours = decode(z, vae, 64, 16, devices="cpu:2", mode="exact")
    assert len(decodes.last.pids()) == 2  # Wan's bands exchange edge rows in lock-step across workers
    assert max_diff(ours, core_decode(z, vae)) <= TOL
    even_speeds(backends.local_pool())
    streamed = to_images(stream_of(z, vae, 64, 16, devices="cpu:2", mode="exact"))
    assert len(decodes.last.pids()) == 2
    assert max_diff(streamed, ours) == 0.0
    torch_threads(worker_threads(pack, "cpu:2"))
    assert torch.equal(ours, decode(z, vae, 64, 16, devices="cpu", mode="exact")), "the same bands in-process"


def test_sigkill_of_a_worker_after_wan_frames_arrived_gives_the_same_frames_once(pack, load_vae, decode, backends,
                                                                               source_of, monkeypatch, decodes):
    """Wan's bands deliver each decoder call's frames as they go: the retry after a lost worker
    decodes the item again and drops the frames that had already arrived."""
    vae, z = load_vae("wan21"), latent(WAN_Z, 5)
    even_speeds(backends.local_pool())
    clean = decode(z, vae, 64, 16, devices="cpu:2", mode="exact")
    pool = backends.local_pool()
    even_speeds(pool)
    victim = pool.pids()["cpu[1]"]
    restarts = pool.stats.restarts
    job = pack.parallel_vae.lockstep_job.LockstepJob
    on_message, results = job.on_message, []

    def killing(self, h, record):
        out = on_message(self, h, record)
        if out is not None:
            results.append((out.tile.index, out.step))
            if len(results) == 2:  # both bands' first frame are in: the worker dies before the next call's
                os.kill(victim, signal.SIGKILL)
        return out

    monkeypatch.setattr(job, "on_message", killing)
    again = decode(z, vae, 64, 16, devices="cpu:2", mode="exact")
    assert pool.stats.restarts == restarts + 1
    assert torch.equal(again, clean)
    assert len(results) == len(set(results)), "a frame was delivered twice"
    assert len(decodes.last.units) == len(results)
    ready = pool.wait_ready(source_of(vae))
    assert len(ready) == 2 and victim not in ready.values()


def test_sigkill_of_a_worker_mid_lockstep_gives_the_same_output_and_a_full_pool(pack, load_vae, decode, backends,
                                                                                source_of):
    vae, z = load_vae("sd"), latent((1, 4, 30, 8), 6)
    clean = decode(z, vae, 64, 16, devices="cpu:2", mode="exact")
    pool = backends.local_pool()
    victim = pool.pids()["cpu[1]"]
    restarts = pool.stats.restarts
    # dies inside the lock-step: its band has answered rounds and waits on the next one's edge rows
    killed = before_sending(pool, "cpu[1]", "SharedRows", sigkill, nth=3)
    again = decode(z, vae, 64, 16, devices="cpu:2", mode="exact")
    assert killed.is_set(), "the worker never reached a third exchange of edge rows"
    assert pool.stats.restarts == restarts + 1
    assert any("restarts" in text for _, text in pool.stats.events)
    assert torch.equal(again, clean)
    ready = pool.wait_ready(source_of(vae))
    assert len(ready) == 2 and victim not in ready.values()


def test_an_out_of_memory_band_on_a_worker_is_split_and_retried_with_the_same_output(
        pack, load_vae, decode, backends, monkeypatch):
    # 4 bands of 16 rows, split into 8 of 8 (bit-identity holds for bands of MIN_BAND_ROWS and more)
    vae, z = load_vae("sd"), latent((1, 4, 64, 8), 7)
    clean = decode(z, vae, 96, 16, devices="cpu:2", mode="exact")
    with faults.injected(monkeypatch, "oom:2:cpu[1]", backends):  # band 2's group fails until split
        again = decode(z, vae, 96, 16, devices="cpu:2", mode="exact")
        events = [text for _, text in backends.local_pool().stats.events]
    assert any("out of memory; bands split 2 ways" in text for text in events), events
    assert torch.equal(again, clean)


def test_interrupt_mid_exact_decode_returns_within_2_s_and_the_next_prompt_succeeds(
        comfy, pack, load_vae, decode, core_decode, backends, monkeypatch):
    import comfy.model_management as mm

    vae = load_vae("sd")
    decode(latent((1, 4, 8, 8), 19), vae, 64, 16, devices="cpu:2", mode="exact")  # warm
    z = latent((1, 4, 64, 40), 20)  # tens of seconds on two CPU workers
    job = pack.parallel_vae.lockstep_job.LockstepJob
    share, rounds = job._share, []

    def counted(self, k):  # the lock-step's sync points, as the parent answers them
        share(self, k)
        rounds.append(k)

    monkeypatch.setattr(job, "_share", counted)
    press = interrupt.Press(lambda: len(rounds) >= 3)  # inside the lock-step, far from its ~60 rounds
    try:
        with pytest.raises(mm.InterruptProcessingException):
            decode(z, vae, 512, 16, devices="cpu:2", mode="exact")
        returned = time.monotonic() - press.at
    finally:
        press.stop()
    assert returned < 2.0, f"returned {returned:.2f} s after the interrupt"
    small = latent((1, 4, 10, 10), 21)
    assert max_diff(decode(small, vae, 64, 16, devices="cpu:2", mode="exact"), core_decode(small, vae)) <= TOL


def planned_rows(pack, vae, z, tile_size: int, devices: str) -> dict[str, int]:
    """Latent rows per lane of the plan the node makes now (shares.split via DecodeJob)."""
    job = pack.nodes.job.DecodeJob.prepare({"samples": z}, vae, tile_size, 16, 64, 8, devices, None, "exact")
    plan = job.plan_for(pack.nodes.backends.backend_for(job.devices)).plan
    return pack.parallel_vae.exact.shares.rows_by_lane(plan)


def test_each_worker_gets_rows_by_its_measured_speed_and_its_memory_with_the_same_output(
        pack, load_vae, decode, core_decode, backends, monkeypatch):
    vae, z = load_vae("sd"), latent((1, 4, 40, 12), 9)
    texts = []
    monkeypatch.setattr(pack.nodes.progress, "send_text", lambda text, node_id: texts.append(text))
    first = decode(z, vae, 512, 16, devices="cpu:2", mode="exact")
    assert max_diff(first, core_decode(z, vae)) <= TOL
    rates = backends.local_pool().speeds.rates
    assert sorted(rates) == ["cpu[0]", "cpu[1]"] and all(r > 0 for r in rates.values()), rates

    # a device measured three times as fast decodes three times the rows; the image is the same
    rates.update({"cpu[0]": 3.0, "cpu[1]": 1.0})
    assert planned_rows(pack, vae, z, 512, "cpu:2") == {"cpu[0]": 30, "cpu[1]": 10}
    fast = decode(z, vae, 512, 16, devices="cpu:2", mode="exact")
    assert "rows by device speed: cpu[0] 240 px rows, cpu[1] 80 px rows" in texts[-1], texts[-1]
    assert torch.equal(fast, first)

    # tile_size auto: a device with less free memory holds fewer rows, the others take the rest
    rates.update({"cpu[0]": 1.0, "cpu[1]": 1.0})
    cost = pack.nodes.vae_info.decode_cost(vae, pack.nodes.vae_info.describe(vae))
    sizing = pack.parallel_vae.sizing
    row_px = 12 * 8 * 8
    mib = (12.5 * row_px * cost.per_px + cost.fixed) / sizing.FRACTION / 2**20  # room for 12 latent rows
    monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, f"cpu[0]={mib:.3f}")
    assert planned_rows(pack, vae, z, 0, "cpu:2") == {"cpu[0]": 12, "cpu[1]": 28}
    capped = decode(z, vae, 0, 16, devices="cpu:2", mode="exact")
    assert "auto: rows by device speed and memory: cpu[0] 96 px rows, cpu[1] 224 px rows" in texts[-1], texts[-1]
    assert torch.equal(capped, first)


def test_the_gate_decodes_a_tiny_latent_in_process_and_a_large_one_on_both_workers(
        pack, load_vae, decode, core_decode, backends, decodes, monkeypatch):
    """sharding=auto: from the measured rates and round trip (parallel_vae/gate.py). The first
    decode measures them; then they are set, so the choice does not depend on this machine's load."""
    texts = []
    monkeypatch.setattr(pack.nodes.progress, "send_text", lambda text, node_id: texts.append(text))
    vae = load_vae("sd")
    large, tiny = latent((1, 4, 40, 12), 12), latent((1, 4, 8, 8), 13)
    decode(tiny, vae, 512, 16, devices="cpu:2", mode="exact", sharding="every device")  # the workers start
    speeds = backends.local_pool().speeds
    local_speeds = pack.parallel_vae.backends.LOCAL_SPEEDS
    for measured in (speeds, local_speeds):  # what earlier tests measured is forgotten
        monkeypatch.setattr(measured, "by_model", {})
    monkeypatch.setattr(speeds, "round_s", None)
    decode(large, vae, 512, 16, devices="cpu:2", mode="exact", sharding="auto")
    assert len(decodes.last.pids()) == 2 and os.getpid() not in decodes.last.pids(), "unmeasured: every lane"
    (model,) = speeds.by_model
    assert sorted(speeds.of(model)) == ["cpu[0]", "cpu[1]"] and speeds.round_s > 0, "measured on the first job"

    # 100 latent positions per second per worker, 160 in-process, 1 ms a round, 50 ms to start:
    # the tiny latent (64 positions: 0.40 s in-process) would take 0.32 s + its rounds + 0.05 s on
    # both workers, not 10% less; the large one (480: 3.0 s) takes 2.4 s + 0.1 s
    monkeypatch.setitem(speeds.by_model, model, {"cpu[0]": 100.0, "cpu[1]": 100.0})
    monkeypatch.setattr(speeds, "round_s", 0.001)
    monkeypatch.setitem(local_speeds.by_model, model, {"cpu": 160.0})
    small = decode(tiny, vae, 512, 16, devices="cpu:2", mode="exact", sharding="auto")
    assert decodes.last.pids() == {os.getpid()}, "the tiny latent decodes in ComfyUI's process"
    assert "in-process: 64x64 is too small to gain from 2 lanes" in texts[-1], texts[-1]
    assert max_diff(small, core_decode(tiny, vae)) <= TOL
    assert local_speeds.of(model)["cpu"] != 160.0, "the in-process decode measured its rate"

    monkeypatch.setitem(local_speeds.by_model, model, {"cpu": 160.0})
    big = decode(large, vae, 512, 16, devices="cpu:2", mode="exact", sharding="auto")
    assert len(decodes.last.pids()) == 2 and os.getpid() not in decodes.last.pids()
    assert max_diff(big, core_decode(large, vae)) <= TOL
    pinned = decode(tiny, vae, 512, 16, devices="cpu:2", mode="exact", sharding="every device")
    assert os.getpid() not in decodes.last.pids() and max_diff(pinned, small) <= TOL
