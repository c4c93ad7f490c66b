"""The worker pool on a small real decoder, without ComfyUI: processes, shared memory, faults,
cancel and shutdown. (tests/comfy/test_workers.py runs the same pool on ComfyUI's VAEs.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from parallel_vae import engine, protocol, shm
from parallel_vae.backends import InProcess, Local, Model
from parallel_vae.blend import allocate_output
from parallel_vae.devices import Device
from parallel_vae.errors import DecodeError
from parallel_vae.models import GenericDecoder
from parallel_vae.plan import AxisScale, plan_image, settings_from_pixels
from parallel_vae.pool import WorkerPool
from parallel_vae.heap import worker_tunables
from parallel_vae.processes import Processes
from parallel_vae.worker import MAX_CACHED_VAES
from parallel_vae.workers import ModelSource, WorkerSpec
from testkit import faults, toy_vae
from testkit.comfy_env import REPO

SCRIPTS = str(REPO / "scripts")


def source(delay: float = 0.0, seed: int = 0) -> ModelSource:
    def recipe(spec):
        return {"factory": "testkit.toy_vae:build", "weights_arg": "sd", "kwargs": {"delay": delay},
                "module_attr": None, "dtype_attr": None, "family": "image"}
    return ModelSource(f"toy-{seed}-{delay}", lambda: toy_vae.weights(seed), recipe)


def make_pool(n: int, **kw) -> WorkerPool:
    specs = [WorkerSpec(f"cpu[{i}]", "cpu", threads=1) for i in range(n)]
    return WorkerPool(specs, Processes([SCRIPTS]), **kw)


def toy_plan(shape=(2, 4, 20, 24), tile=64, overlap=16):
    settings = settings_from_pixels(tile, overlap, 64, 8, toy_vae.FACTOR, None)
    return plan_image(shape, settings, AxisScale(toy_vae.FACTOR), 3)


def latent(shape=(2, 4, 20, 24), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def local_reference(plan, z, seed=0):
    """The same plan decoded by the in-process backend."""
    decoder = GenericDecoder(toy_vae.build(toy_vae.weights(seed)), torch.float32, "cpu")
    model = Model(source(seed=seed), local=lambda device, plan: Local(decoder, executor=lambda: None))
    _, out = allocate_output(plan)
    engine.decode(plan, z, InProcess(Device("cpu", 0), free=lambda d: 0).results(plan, z, model), out)
    return out


def pool_decode(pool, plan, z, src=None, on_unit=None, poll=lambda: None):
    _, out = allocate_output(plan)
    report = engine.decode(plan, z, pool.run(plan, z, src or source(), poll), out, on_unit=on_unit)
    return out, report


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) is not alive
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def wait_gone(pids, timeout=5.0) -> float:
    start = time.monotonic()
    while any(alive(p) for p in pids):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"worker processes {[p for p in pids if alive(p)]} outlived {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def pool2():
    pool = make_pool(2)
    pool.warm(source())  # both up: a job starts on whichever workers are ready
    yield pool
    pool.shutdown()


def test_tiles_run_in_the_workers_and_equal_an_in_process_decode(pool2):
    plan, z = toy_plan(), latent()
    out, report = pool_decode(pool2, plan, z)
    assert torch.equal(out, local_reference(plan, z))
    pids = set(pool2.pids().values())
    assert len(pids) == 2 and os.getpid() not in pids
    assert report.pids() == pids, "both workers took tiles"
    assert sorted((t, s) for t, s, _, _ in report.units) == [(t.index, 0) for t in plan.tiles]
    want = worker_tunables(os.environ)  # malloc asks for huge pages in workers (heap.py)
    assert want and "glibc.malloc.hugetlb" in want
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert f"GLIBC_TUNABLES={want}".encode() in f.read().split(b"\0")


def test_a_second_job_reuses_the_workers_and_sends_no_weights(pool2):
    plan, z = toy_plan(), latent(seed=2)
    pool_decode(pool2, plan, z)
    pids, sent, loads = pool2.pids(), pool2.stats.weights_bytes, pool2.stats.loads
    out, report = pool_decode(pool2, plan, z)
    assert pool2.pids() == pids and report.pids() == set(pids.values())
    assert pool2.stats.weights_bytes == sent and pool2.stats.loads == loads
    assert torch.equal(out, local_reference(plan, z))


def test_a_different_model_replaces_it_and_shared_memory_is_released(pool2):
    plan, z = toy_plan(), latent(seed=3)
    sent = pool2.stats.weights_bytes
    out, _ = pool_decode(pool2, plan, z, source(seed=5))
    assert pool2.stats.weights_bytes > sent
    assert torch.equal(out, local_reference(plan, z, seed=5))
    mine = [n for n in os.listdir("/dev/shm") if n.startswith(f"pvae_{os.getpid()}_") and "_slots_" not in n]
    assert mine == [], "weights and latent blocks are unlinked once the job is over"


def test_a_load_in_flight_that_evicts_a_vae_keeps_its_tasks_off_that_worker():
    """A worker holding the most VAEs it keeps is sent a third (a load a small job left running);
    the next job's VAE is the one that load evicts. Its task must not follow the Load into the
    worker as if the VAE were still there (it failed there with a KeyError)."""
    pool = make_pool(1)
    try:
        plan, z = toy_plan(), latent(seed=4)
        for seed in range(MAX_CACHED_VAES):  # the worker now holds seeds 0.. (0 least recent)
            pool_decode(pool, plan, z, source(seed=seed))
        pool.workers.want_model(source(seed=9))  # sent, not waited for: its Loaded comes later
        out, _ = pool_decode(pool, plan, z, source(seed=0))
        assert torch.equal(out, local_reference(plan, z, seed=0))
    finally:
        pool.shutdown()


def test_a_load_still_running_keeps_its_weights_when_another_vae_is_sent():
    """A small job can end with a worker still loading its VAE while the next job's VAE goes to
    the others. The first VAE's weights block must stay until that worker has opened it: it was
    unlinked, and the load failed with FileNotFoundError inside the next job."""
    pool = make_pool(2)
    try:
        pool.warm(source(seed=0))
        late, other = pool.handles
        os.kill(late.pid, signal.SIGSTOP)  # it reads its Load only once let go
        try:
            pool.workers.want_model(source(seed=7))  # a Load to each
            deadline = time.monotonic() + 30
            while other.loading and time.monotonic() < deadline:
                for h, record in pool.workers.receive(0.05):
                    if record is not None:
                        pool.workers.on_common(h, record)
            assert other.loading is None and late.loading is not None
            pool.workers.want_model(source(seed=8))  # only the other: the late one still loads
        finally:
            os.kill(late.pid, signal.SIGCONT)
        plan, z = toy_plan(), latent(seed=6)
        out, _ = pool_decode(pool, plan, z, source(seed=7))
        assert torch.equal(out, local_reference(plan, z, seed=7))
    finally:
        pool.shutdown()


def test_a_job_right_after_idle_workers_were_told_to_drop_their_vaes_ships_the_vae_again():
    """The idle timeout sends Drop; a job that starts before the worker answers must not take the
    worker's last word (it held the VAE) as still true: its task would find the VAE gone."""
    pool = make_pool(1)
    try:
        plan, z = toy_plan(), latent(seed=9)
        pool_decode(pool, plan, z)
        loads = pool.stats.loads
        pool.workers.drop_models()  # sent, not waited for
        out, _ = pool_decode(pool, plan, z)
        assert torch.equal(out, local_reference(plan, z))
        assert pool.stats.loads == loads + 1, "the worker built the VAE again"
    finally:
        pool.shutdown()


class RefusingLoads:
    """A worker's connection whose sending of a Load fails in the parent, as a Ray put does when
    the object store and the disk are full; everything else goes through."""

    def __init__(self, conn):
        self.conn = conn

    def send(self, wire):
        if wire[0] == "load":
            raise RuntimeError("the object store is full")
        return self.conn.send(wire)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_a_load_that_could_not_be_sent_leaves_the_worker_free_for_the_next_one():
    """A Load whose sending raised never reached the worker: it must not be taken as loading (the
    worker was never sent another VAE and sat out every later job: clean-clone CI, a Ray put
    refused on a full disk) nor as having dropped a VAE to make room."""
    pool = make_pool(1)
    try:
        plan, z = toy_plan(), latent(seed=5)
        for seed in range(MAX_CACHED_VAES):  # full: a Load sent would drop seed 0
            pool_decode(pool, plan, z, source(seed=seed))
        h = pool.workers.handles[0]
        held = h.models
        h.channel.conn = RefusingLoads(h.channel.conn)
        try:
            with pytest.raises(RuntimeError, match="object store is full"):
                pool.workers.want_model(source(seed=9))
        finally:
            h.channel.conn = h.channel.conn.conn
        assert h.loading is None and h.models == held
        out, _ = pool_decode(pool, plan, z, source(seed=9))
        assert torch.equal(out, local_reference(plan, z, seed=9))
    finally:
        pool.shutdown()


def test_largest_tiles_are_handed_out_first():
    """One worker decodes its tasks in the order they were handed out: largest first, plan order
    among equals."""
    plan, z = toy_plan((1, 4, 21, 27), tile=96, overlap=32), latent((1, 4, 21, 27))
    pool = make_pool(1)
    try:
        _, report = pool_decode(pool, plan, z)
    finally:
        pool.shutdown()
    arrived = [t for t, *_ in report.units]
    assert arrived == sorted(arrived, key=lambda t: (-plan.tiles[t].volume, t))
    assert plan.tiles[arrived[0]].volume > plan.tiles[arrived[-1]].volume, "tiles of different sizes"


def test_a_worker_killed_mid_job_is_replaced_and_the_output_is_unchanged(pool2):
    plan, z = toy_plan(), latent(seed=4)
    slow = source(delay=0.05)
    pool2.warm(slow)
    victim = pool2.pids()["cpu[1]"]
    killed = []

    def on_unit(unit):
        if not killed and unit.by == "cpu[0]":
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    out, report = pool_decode(pool2, plan, z, slow, on_unit)
    assert killed and torch.equal(out, local_reference(plan, z))
    assert any("died" in text and str(victim) in text for _, text in pool2.stats.events)
    ready = pool2.wait_ready(slow)
    assert len(ready) == 2 and victim not in ready.values(), "the pool is back to full size"


def test_interrupt_returns_quickly_drops_queued_tiles_and_the_next_job_succeeds(pool2):
    plan, z = toy_plan((1, 4, 40, 40), tile=64, overlap=16), latent((1, 4, 40, 40))
    slow = source(delay=0.3)
    pool2.warm(slow)
    asked = []

    def poll():
        if len(asked) == 1:
            raise KeyboardInterrupt("interrupted")

    def on_unit(unit):
        if not asked:
            asked.append(time.monotonic())

    with pytest.raises(KeyboardInterrupt):
        pool_decode(pool2, plan, z, slow, on_unit, poll)
    assert time.monotonic() - asked[0] < 2.0
    out, report = pool_decode(pool2, toy_plan(), latent(seed=6))
    assert torch.equal(out, local_reference(toy_plan(), latent(seed=6)))
    assert len(report.units) == len(toy_plan().tiles), "late results of the cancelled job were dropped"


def test_an_interrupt_mid_batch_loses_no_record(pool2):
    """The consumer stops on a result (ComfyUI's interrupt, raised from the progress update) while
    the batch it came in still holds other records: the other worker's Done among them. They must
    reach the pool all the same: lost, that task stayed on the worker for good (an exact decode then
    waited on it forever)."""
    plan, z = toy_plan(), latent(seed=8)
    pool2.warm(source())
    seen = []

    def on_unit(unit):
        seen.append(unit)
        if len(seen) == 1:
            time.sleep(1.0)  # the other worker finishes its tile: its Result and Done come in one batch
        else:
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        pool_decode(pool2, plan, z, on_unit=on_unit)
    deadline = time.monotonic() + 10
    while any(h.tasks for h in pool2.handles) and time.monotonic() < deadline:
        pool2.workers.drain()
        time.sleep(0.05)
    assert not [h.tasks for h in pool2.handles if h.tasks], "a task stayed on a worker"
    out, _ = pool_decode(pool2, plan, z)
    assert torch.equal(out, local_reference(plan, z))


def test_out_of_memory_on_one_worker_retries_the_tile_on_another(monkeypatch):
    faults.enable(monkeypatch, "oom:*:cpu[0]")
    pool = make_pool(2)
    try:
        pool.warm(source())
        plan, z = toy_plan(), latent(seed=7)
        out, report = pool_decode(pool, plan, z)
        assert torch.equal(out, local_reference(plan, z))
        assert report.per_lane().get("cpu[0]", 0) == 0 and pool.stats.requeued >= 1
    finally:
        pool.shutdown()


def test_out_of_memory_everywhere_is_a_clear_error(monkeypatch):
    faults.enable(monkeypatch, "oom:*:cpu[0]")
    pool = make_pool(1)
    try:
        with pytest.raises(DecodeError, match="ran out of memory on every device.*smaller tile_size"):
            pool_decode(pool, toy_plan(), latent())
    finally:
        pool.shutdown()


def test_a_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    faults.enable(monkeypatch, "start")
    pool = make_pool(2)
    try:
        with pytest.raises(DecodeError, match=r"cpu\[0\]: could not start: RuntimeError: .*fails on start"):
            pool_decode(pool, toy_plan(), latent())
    finally:
        pool.shutdown()


def test_an_unknown_device_is_a_clear_error():
    pool = WorkerPool([WorkerSpec("npu:0", "npu:0")], Processes([SCRIPTS]))
    try:
        with pytest.raises(DecodeError, match=r"npu:0: could not start: .*npu"):
            pool.warm(source())
    finally:
        pool.shutdown()


def test_shutdown_stops_every_worker():
    pool = make_pool(2)
    pool.warm(source())
    pids = list(pool.pids().values())
    pool.shutdown()
    assert wait_gone(pids, 5.0) < 5.0


PARENT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}, {scripts!r}]
    from tests.unit.test_pool import make_pool, source
    pool = make_pool(2)
    print(" ".join(str(p) for p in pool.warm(source(delay=5.0)).values()), flush=True)
    {work}
    time.sleep(60)
""")


@pytest.mark.parametrize("busy", [False, True])
def test_workers_exit_within_5_s_when_their_parent_is_killed(busy):
    work = ("import threading, torch; from tests.unit.test_pool import pool_decode, toy_plan, latent; "
            "threading.Thread(target=pool_decode, args=(pool, toy_plan(), latent(), source(delay=5.0)), "
            "daemon=True).start(); time.sleep(1)") if busy else ""
    code = PARENT.format(repo=str(REPO), scripts=SCRIPTS, work=work)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.5 if busy else 0.2)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert wait_gone(pids, 5.0) < 5.0
    finally:
        parent.kill()
        parent.wait()


def test_shared_memory_views_and_blocks():
    block, manifest = shm.pack({"a": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)})
    try:
        attached = shm.Attached(block.name, block.size)
        got = shm.unpack(attached.buf, manifest)
        assert torch.equal(got["a"], torch.arange(6.0).view(2, 3)) and got["b"].dtype == torch.bfloat16
        got["a"][0, 0] = 42.0  # writable, and the same memory as the parent's
        assert shm.unpack(block.buf, manifest)["a"][0, 0] == 42.0
        del got
        attached.close()
    finally:
        shm.release(block)
    assert not os.path.exists(f"/dev/shm/{block.name}")


def test_a_task_whose_job_is_gone_is_answered_so_the_worker_stays_usable(pool2):
    """A job cancelled before a worker read its job message: the worker must still answer the
    task, or the pool would count it in flight forever and never give that worker another tile."""
    h = pool2.handles[0]
    h.tasks.append((10**9, 0))
    h.send(protocol.Task(10**9, 0, (0,)))
    deadline = time.monotonic() + 10
    answered = []
    while not answered and time.monotonic() < deadline:
        answered = [m for w, m in pool2.workers.receive(0.05)
                    if w is h and isinstance(m, protocol.Failed) and (m.job_id, m.key) == (10**9, 0)]
    assert answered and answered[0].why is protocol.Failure.CANCELLED
    h.tasks.remove((10**9, 0))
    out, report = pool_decode(pool2, toy_plan(), latent(seed=8))
    assert torch.equal(out, local_reference(toy_plan(), latent(seed=8)))
