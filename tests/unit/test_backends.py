"""The backend interface (parallel_vae/backends.py), the same calls on all three backends: ComfyUI's
own process, local worker processes and Ray actors (a simulated cluster on this machine), with the
small real decoder of testkit.toy_vae instead of ComfyUI. Each answers for its lanes by name, and
decodes a plan to the same pixels."""
from __future__ import annotations

import os

import pytest
import torch

from parallel_vae import engine
from parallel_vae.backends import InProcess, Local, LocalWorkers, Model, RayLanes
from parallel_vae.blend import allocate_output
from parallel_vae.devices import parse
from parallel_vae.exact.shares import Terms
from parallel_vae.models import GenericDecoder
from parallel_vae.plan import AxisScale, plan_image, settings_from_pixels
from parallel_vae.pool import WorkerPool
from parallel_vae.processes import Processes
from parallel_vae.workers import ModelSource, WorkerSpec
from testkit import ray_cluster, toy_vae
from testkit.comfy_env import REPO

SCRIPTS = str(REPO / "scripts")
FREE = 3 << 30  # what the in-process backend's host says is free


def model() -> Model:
    def recipe(spec):
        return {"factory": "testkit.toy_vae:build", "weights_arg": "sd", "kwargs": {}, "module_attr": None,
                "dtype_attr": None, "family": "image"}

    decoder = GenericDecoder(toy_vae.build(toy_vae.weights(3)), torch.float32, "cpu")
    return Model(ModelSource("toy-3", lambda: toy_vae.weights(3), recipe),
                 local=lambda device, plan: Local(decoder, executor=lambda: None))


def in_process():
    return InProcess(parse("cpu", cuda_devices=0)[0], free=lambda torch_device: FREE), 1


def local_workers():
    devices = parse("cpu:2", cuda_devices=0)
    specs = [WorkerSpec(d.name, "cpu", threads=1) for d in devices]
    return LocalWorkers(devices, WorkerPool(specs, Processes([SCRIPTS]))), 2


@pytest.fixture(scope="module")
def ray_lanes():
    ray = pytest.importorskip("ray")
    from parallel_vae.ray_workers import RayActors, RayWorkerSpec, py_modules

    backend = None
    with ray_cluster.simulated(2) as cluster:
        ray.init(address=cluster.address, runtime_env={"py_modules": py_modules()}, logging_level="warning",
                 log_to_driver=False)
        try:
            nodes = sorted(ray_cluster.worker_node_ids(cluster))
            specs = [RayWorkerSpec(f"node{i}/cpu", "cpu", threads=1, node_id=node, num_cpus=1)
                     for i, node in enumerate(nodes)]
            backend = RayLanes(WorkerPool(specs, RayActors([SCRIPTS])))
            yield backend, 2
        finally:
            if backend is not None:
                backend.shutdown()
            ray.shutdown()


@pytest.fixture(params=["in-process", "local workers", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request):
    if request.param == "ray":
        return request.getfixturevalue("ray_lanes")
    made, lanes = in_process() if request.param == "in-process" else local_workers()
    request.addfinalizer(getattr(made, "shutdown", lambda: None))
    return made, lanes


def decode(backend, plan, z, order="tile"):
    _, out = allocate_output(plan)
    report = engine.decode(plan, z, backend.results(plan, z, model(), order), out)
    return out, report


def toy_plan():
    settings = settings_from_pixels(64, 16, 64, 8, toy_vae.FACTOR, None)
    return plan_image((1, 4, 12, 20), settings, AxisScale(toy_vae.FACTOR), 3)


def test_a_backend_answers_for_its_lanes_by_name(backend):
    made, count = backend
    assert len(made.lanes) == len(set(made.lanes)) == count and made.note
    free = made.free_bytes()
    assert sorted(free) == sorted(made.lanes) and all(isinstance(b, int) and b > 0 for b in free.values()), free
    if isinstance(made, InProcess):
        assert free == {"cpu": FREE}, "ComfyUI's own view of its device"
    assert made.speeds() == dict.fromkeys(made.lanes, 1.0), "no exact band measured yet"


def test_exact_terms_are_one_per_lane_where_lanes_decode_at_once(backend):
    made, count = backend
    terms = made.exact_terms(band_rows=8)
    if isinstance(made, InProcess):
        assert terms == [], "one lane decodes every band in turn: bands are sized by tile_size"
        return
    assert terms == [Terms(name, 1.0, None, 8) for name in made.lanes]
    rows = {name: 10 + i for i, name in enumerate(made.lanes)}
    assert made.exact_terms(8, rows) == [Terms(name, 1.0, rows[name], rows[name]) for name in made.lanes]


def test_every_backend_decodes_the_same_pixels_and_says_which_lane_did(backend):
    made, count = backend
    plan = toy_plan()
    z = torch.randn(plan.in_shape, generator=torch.Generator().manual_seed(5))
    reference, _ = decode(in_process()[0], plan, z)
    out, report = decode(made, plan, z)
    assert torch.equal(out, reference)
    assert sorted((t, s) for t, s, _, _ in report.units) == [(t.index, 0) for t in plan.tiles]
    assert set(report.per_lane()) <= set(made.lanes)
    if isinstance(made, InProcess):
        assert report.pids() == {os.getpid()}
    else:
        assert os.getpid() not in report.pids()
    rows = made.report()
    assert rows["devices" if "devices" in rows else "lanes"] == made.lanes
    running = made.release()
    assert running == (0 if isinstance(made, InProcess) else count)
    again, _ = decode(made, plan, z)  # a released backend starts again on the next decode
    assert torch.equal(again, reference)
