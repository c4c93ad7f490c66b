"""Workers as Ray actors, for devices on other machines: a Transport (workers.py) whose channels
are actors, so the same records and the same job logic (jobs.py, lockstep_job.py) run over them.

- A channel's worker is a ``ParallelVAEWorker`` actor (ray_actor.py) pinned to one node (hard
  node affinity), with no Ray restarts and no Ray task retries: a lost actor is a dead worker, its
  units are requeued by the job, and the next round starts a fresh actor on the same node, as a
  dead local process is started again. Our scheduler stays the only retry authority.
- Records go out through ``post`` (numbered: a threaded actor may run calls out of order) and come
  back through a long-polled ``take``.
- The blocks that records name (``Record.blocks``) travel through the object store: the weights
  once per VAE (the parent's shared-memory block, put once and fetched once per machine), the
  latent once per job. Result slots live in the actor, and each Result brings its pixels, which are
  written into the parent's own slot for that worker, so jobs read them as from a local worker.
- Actors are owned by ComfyUI's process: they die with it (Ray's owner fate-sharing).

Ray is imported lazily (never at import time: ``ray.init`` in ComfyUI's main thread would replace
its signal handlers; the node connects from its own thread).
"""
from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from . import protocol as msgs
from . import shm
from .errors import DecodeError
from .workers import PACKAGE_ROOT, START_TIMEOUT_S, Channel, Death, Handle, Lost, Transport, WorkerSpec

log = logging.getLogger("parallel_vae")

TAKE_S = 0.5  # an actor's long poll for records
KEEP_BLOCKS = 4  # object refs of the latest blocks (weights of two VAEs, latents of running jobs)


@dataclass(frozen=True)
class RayWorkerSpec(WorkerSpec):
    """A worker on one node of the cluster: its node, and what it reserves there."""

    node_id: str = ""
    node_ip: str = ""
    num_gpus: float = 0.0
    num_cpus: float = 1.0


def actor_class_here():
    """The actor class under its canonical module name: Ray pickles classes by module name, and
    inside ComfyUI this package is imported under a path-shaped name that actors cannot import
    (they import ``parallel_vae`` from the job's py_modules, see py_modules)."""
    import importlib
    import sys

    if PACKAGE_ROOT not in sys.path:
        sys.path.append(PACKAGE_ROOT)
    return importlib.import_module("parallel_vae.ray_actor").ParallelVAEWorker


def py_modules() -> list[str]:
    """What ``ray.init(runtime_env={"py_modules": ...})`` ships to every node: this package."""
    return [os.path.join(PACKAGE_ROOT, "parallel_vae")]


class Actor(Channel):
    """One worker actor: the parent's end of its records, and the parent's result slots for it."""

    def __init__(self, transport: "RayActors", spec: RayWorkerSpec, actor):
        self.transport, self.spec, self.actor = transport, spec, actor
        self.seq = 0
        self.take_ref = None
        self.slots = None  # the parent's arena block, mapped here to write results into
        self.slot_bytes = 0

    def send(self, record: msgs.Record) -> None:
        if self.actor is None:
            return
        named = record.blocks()
        refs = [self.transport.block_ref(name, nbytes) for name, nbytes in named]
        if isinstance(record, msgs.Arena):
            if self.slots is not None:
                self.slots.close()
            self.slots, self.slot_bytes = shm.Attached(record.name, record.nbytes), record.slot_bytes
        self.seq += 1
        self.actor.post.remote(self.seq, [record.wire()], [name for name, _ in named], *refs)

    def kill(self) -> None:
        import ray

        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # already gone
                pass

    def end(self) -> str:
        self.kill()
        self.actor, self.take_ref = None, None
        if self.slots is not None:
            self.slots.close()
            self.slots = None
        return "its actor died"

    def write(self, record: msgs.Result, dtype: str, data: bytes) -> None:
        """A Result's pixels into the parent's float32 slot for this worker, widened as the local
        worker widens them (exactly: they came from that dtype)."""
        import torch

        slot = shm.view(self.slots.buf, torch.float32, record.shape, record.slot * self.slot_bytes)
        slot.copy_(shm.view(bytearray(data), getattr(torch, dtype), record.shape))

    def row(self) -> dict:
        return {"node": self.spec.node_ip, "rss_mib": None}  # its memory is on its own machine


class RayActors(Transport):
    """Actors on the nodes the specs name; counts what crosses the object store."""

    def __init__(self, python_path: Sequence[str] = ()):
        self.python_path = [*python_path, PACKAGE_ROOT]
        self.refs: dict = {}  # block name -> object ref (the latest KEEP_BLOCKS)
        self.puts = 0  # blocks put into the object store (a warm prompt puts only its latent)
        self.put_bytes = 0
        self.result_bytes = 0  # pixels received, in the decoders' dtypes
        self.result_nodes = collections.Counter()  # results per node id, as each actor reported its node

    def block_ref(self, name: str, nbytes: int):
        """The object ref of the parent's shared-memory block ``name``, put once."""
        import numpy as np
        import ray

        ref = self.refs.get(name)
        if ref is None:
            block = shm.Attached(name, nbytes)
            try:
                ref = ray.put(np.frombuffer(block.buf, dtype=np.uint8, count=nbytes))
            except (ray.exceptions.ObjectStoreFullError, ray.exceptions.OutOfDiskError) as e:
                raise DecodeError(
                    f"Ray's object store on this machine could not take {nbytes / 2**20:.1f} MiB (a VAE's "
                    f"weights or a latent): give it more memory (ray start --object-store-memory=BYTES) or "
                    f"free disk space for Ray's spilling. Ray said: {str(e).strip()}") from e
            finally:
                block.close()
            self.refs[name] = ref
            self.puts += 1
            self.put_bytes += nbytes
            for old in list(self.refs)[:-KEEP_BLOCKS]:
                del self.refs[old]
        return ref

    def spawn(self, spec: RayWorkerSpec) -> Actor:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_class = ray.remote(actor_class_here())
        env = {"OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads), **dict(spec.env)}
        actor = actor_class.options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=0, max_task_retries=0,
            max_concurrency=4, scheduling_strategy=NodeAffinitySchedulingStrategy(spec.node_id, soft=False),
            runtime_env={"env_vars": env},
        ).remote(tuple(self.python_path))
        return Actor(self, spec, actor)  # its pid comes with its Up

    def receive(self, channels: Sequence[Actor], timeout: float):
        import ray

        live = [a for a in channels if a.actor is not None]
        for a in live:
            if a.take_ref is None:
                a.take_ref = a.actor.take.remote(TAKE_S)
        by_ref = {a.take_ref: a for a in live}
        if not by_ref:
            return []
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        out = []
        for ref in ready:
            a = by_ref[ref]
            a.take_ref = None
            try:
                node_id, items = ray.get(ref)
            except Exception as e:  # RayActorError, ActorUnschedulableError: the actor or its node is gone
                # its machine left the cluster: starting it there again cannot help (the next
                # prompt's lanes are the machines that are left)
                gone = isinstance(e, ray.exceptions.ActorUnschedulableError)
                out.append((a, [], Lost(Death.START_FAILED if gone else Death.CRASHED,
                                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")))
                continue
            records, lost = [], None
            for wire, payload in items:
                try:
                    record = msgs.parse(wire)
                except msgs.ProtocolError as e:
                    lost = Lost(Death.CRASHED, f"sent a message the pool cannot read: {e}")
                    break
                if isinstance(record, msgs.Up):
                    a.pid = record.pid
                if isinstance(record, msgs.Result) and payload is not None and a.slots is not None:
                    a.write(record, *payload)
                    self.result_bytes += len(payload[1])
                    self.result_nodes[node_id] += 1
                records.append(record)
            out.append((a, records, lost))
        return out

    def stop(self, channels: Sequence[Actor]) -> None:
        self.refs.clear()
        for a in channels:
            a.kill()

    def free_memory(self, handles: Sequence[Handle]) -> dict[str, int]:
        """{lane: free bytes} as each live actor measures on its machine (CUDA's free memory, or its
        share of the node's available RAM); a lane that does not answer within the start timeout
        is left out."""
        import ray

        cpu_lanes = collections.Counter(h.spec.node_id for h in handles if h.spec.device == "cpu")
        refs = {h.name: h.channel.actor.free_memory.remote(h.spec.device, cpu_lanes[h.spec.node_id])
                for h in handles if h.live and h.channel is not None and h.channel.actor is not None}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = int(ray.get(ref, timeout=START_TIMEOUT_S))
            except Exception as e:  # its death shows in the job as any other
                log.warning("parallel_vae: Ray lane %s did not report its free memory: %s", name,
                            str(e).splitlines()[0][:200])
        return out


__all__ = ["Actor", "RayActors", "RayWorkerSpec", "actor_class_here", "py_modules"]
