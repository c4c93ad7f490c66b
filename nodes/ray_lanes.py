"""ComfyUI's side of Ray lanes: attach to the cluster, and one lane per GPU (or N CPU lanes) of
each of its machines.

The connection is made when a node runs, in the node's thread, never at import: ``ray.init`` in
ComfyUI's main thread would replace its SIGTERM handler. It never starts a private cluster: with
no cluster to attach to, the node fails saying how to start one. A connection someone else made
(another node pack) is reused and never shut down by us.
"""
from __future__ import annotations

import dataclasses
import os
import socket

from ..parallel_vae.devices import Device
from ..parallel_vae.errors import InputError
from ..parallel_vae.ray_workers import RayWorkerSpec, py_modules
from . import compat

TESTED_RAY = "2.60.0"
START_HINT = ("start one with `ray start --head` on this machine (and `ray start --address=<head ip>:6379` on the "
              "others), or set RAY_ADDRESS to a running cluster")


def connect():
    """The ``ray`` module, attached to the cluster (RAY_ADDRESS, else the local head)."""
    try:
        import ray
    except ImportError:
        raise InputError("devices", f"Ray is not installed in ComfyUI's Python: pip install ray=={TESTED_RAY}") from None
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS") or "auto"
    unreachable = _unreachable(address)
    if unreachable:
        raise InputError("devices", f"no Ray cluster to attach to at {address!r} ({unreachable}); {START_HINT}")
    try:
        ray.init(address=address, namespace="parallel_vae", logging_level="warning", log_to_driver=False,
                 runtime_env={"py_modules": py_modules()})
    except ConnectionError as e:
        raise InputError("devices", f"no Ray cluster to attach to at {address!r} ({str(e).splitlines()[0][:160]}); "
                                    f"{START_HINT}") from None
    return ray


def _unreachable(address: str) -> str:
    """Why ``host:port`` takes no connection ("" if it does, or for "auto"): ray.init would wait
    minutes for a cluster that is not there."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return ""
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return ""
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def lane_specs(ray, device: Device) -> list[RayWorkerSpec]:
    """One worker spec per GPU of every live node (``ray``), or N CPU lanes per node
    (``ray:cpu:N``); each lane named by machine and device, e.g. ``10.0.0.7/cuda:1``. One look at
    the cluster's nodes."""
    specs = []
    for node in sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeManagerAddress"]):
        ip, res = node["NodeManagerAddress"], node.get("Resources", {})
        if device.index:  # ray:cpu:N
            if res.get("CPU", 0) < 1:
                continue  # a head that takes no work
            for i in range(device.index):
                specs.append(RayWorkerSpec(f"{ip}/cpu[{i}]", "cpu", threads=1, env=compat.CPU_WORKER_ENV,
                                           setup=compat.CPU_WORKER_SETUP, node_id=node["NodeID"], node_ip=ip,
                                           num_cpus=1))
        else:
            for i in range(int(res.get("GPU", 0))):
                specs.append(RayWorkerSpec(f"{ip}/cuda:{i}", "cuda:0", threads=1, node_id=node["NodeID"],
                                           node_ip=ip, num_gpus=1, num_cpus=0))
    names = [s.name for s in specs]
    for name in {n for n in names if names.count(n) > 1}:  # two nodes on one machine (a test cluster)
        k = 0
        for j, s in enumerate(specs):
            if s.name == name:
                specs[j] = dataclasses.replace(s, name=f"{s.node_ip}#{k}/{s.name.split('/', 1)[1]}")
                k += 1
    if not specs:
        what = "GPU" if not device.index else "node with a CPU for work"
        raise InputError("devices", f"the Ray cluster has no {what}; " + (
            "use ray:cpu:N for CPU lanes, or start nodes with GPUs" if not device.index else START_HINT))
    return specs
