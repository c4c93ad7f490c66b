"""Workers as Ray actors, for devices on other machines: the same records and the same job logic
(jobs.py, lockstep_job.py) as local worker processes; only the transport differs.

- A handle's "process" is a ``ParallelVAEWorker`` actor (ray_actor.py) pinned to one node (hard
  node affinity), with no Ray restarts and no Ray task retries: a lost actor is a dead worker, its
  units are requeued by the job, and the next round starts a fresh actor on the same node, as a
  dead local process is started again. Our scheduler stays the only retry authority.
- Records go out through ``post`` (numbered: a threaded actor may run calls out of order) and come
  back through a long-polled ``take``.
- The blocks that records name travel through the object store: the weights once per VAE (the
  parent's shared-memory block, put once and fetched once per machine), the latent once per job;
  result slots live in the actor, and each Result brings its pixels, which are written into the
  parent's own slot for that worker, so jobs read them as from a local worker.
- Actors are owned by ComfyUI's process: they die with it (Ray's owner fate-sharing).

Ray is imported lazily (never at import time: ``ray.init`` in ComfyUI's main thread would replace
its signal handlers; the node connects from its own thread).
"""
from __future__ import annotations

import collections
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

from . import protocol as msgs
from . import shm
from .errors import DecodeError
from .processes import (PACKAGE_ROOT, START_TIMEOUT_S, Death, Handle, Workers, WorkerSpec, WorkerState,
                        release_weights, stopped)

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


class RayHandle(Handle):
    def __init__(self, spec: RayWorkerSpec):
        super().__init__(spec)
        self.actor = None
        self.take_ref = None
        self.seq = 0

    def kill(self) -> None:
        import ray

        if self.actor is not None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # already gone
                pass


class RayConn:
    """The parent's end of a handle: ``send`` posts a record with the blocks it names."""

    def __init__(self, workers: "RayWorkers", h: RayHandle):
        self.workers, self.h = workers, h

    def send(self, wire: tuple) -> None:
        kind = wire[0]
        names, refs = [], []
        if kind == "load":  # (kind, fingerprint, recipe, block, nbytes, manifest)
            names, refs = [wire[3]], [self.workers.block_ref(wire[3], wire[4])]
        elif kind == "job":  # (kind, job_id, fingerprint, plan, (block, nbytes, dtype, shape))
            name, nbytes = wire[4][0], wire[4][1]
            names, refs = [name], [self.workers.block_ref(name, nbytes)]
        h = self.h
        h.seq += 1
        h.actor.post.remote(h.seq, [wire], names, *refs)

    def close(self) -> None:
        pass


def _stop_actors(handles: list, shared: dict) -> None:
    """End every actor (the finalizer's job too: a module function, it must not hold the pool)."""
    release_weights(shared)
    shared.pop("refs", None)
    for h in handles:
        if h.actor is not None:
            h.kill()
            h.actor = None
        h.take_ref = None
        stopped(h)


def actor_class_here():
    """The actor class under its canonical module name: Ray pickles classes by module name, and
    inside ComfyUI this package is imported under a path-shaped name that actors cannot import
    (they import ``parallel_vae`` from the job's py_modules, see connect)."""
    import importlib
    import sys

    if PACKAGE_ROOT not in sys.path:
        sys.path.append(PACKAGE_ROOT)
    return importlib.import_module("parallel_vae.ray_actor").ParallelVAEWorker


def py_modules() -> list[str]:
    """What ``ray.init(runtime_env={"py_modules": ...})`` ships to every node: this package."""
    return [os.path.join(PACKAGE_ROOT, "parallel_vae")]


class RayWorkers(Workers):
    """One actor per RayWorkerSpec; the rest is Workers' (models, slots, records, deaths)."""

    def __init__(self, specs: Sequence[RayWorkerSpec], python_path: Sequence[str] = (),
                 imports: Sequence[str] = (), max_restarts: Optional[int] = None):
        super().__init__(specs, python_path, imports, max_restarts)
        self.stop.detach()  # the local processes' finalizer: there are none
        self.handles = [RayHandle(s) for s in self.specs]
        self.stop = weakref.finalize(self, _stop_actors, self.handles, self._shared)
        self.puts = 0  # blocks put into the object store (a warm prompt puts only its latent)
        self.put_bytes = 0
        self.result_bytes = 0  # pixels received, in the decoders' dtypes
        self.result_nodes = collections.Counter()  # results per node id, as each actor reported its node

    # -- blocks -----------------------------------------------------------------------------------
    def block_ref(self, name: str, nbytes: int):
        """The object ref of the parent's shared-memory block ``name``, put once."""
        import numpy as np
        import ray

        refs = self._shared.setdefault("refs", {})
        ref = refs.get(name)
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
            refs[name] = ref
            self.puts += 1
            self.put_bytes += nbytes
            for old in list(refs)[:-KEEP_BLOCKS]:
                del refs[old]
        return ref

    def _write(self, h: RayHandle, record, dtype: str, data: bytes) -> None:
        """A Result's pixels into the parent's float32 slot for this worker, widened as the local
        worker widens them (exactly: they came from that dtype)."""
        import torch

        slot = shm.view(h.arena.buf, torch.float32, record.shape, record.slot * h.slot_bytes)
        slot.copy_(shm.view(bytearray(data), getattr(torch, dtype), record.shape))
        self.result_bytes += len(data)

    # -- actors -----------------------------------------------------------------------------------
    def spawn(self, h: RayHandle) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        spec: RayWorkerSpec = h.spec
        actor_class = ray.remote(actor_class_here())
        env = {"OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads), **dict(spec.env)}
        h.actor = actor_class.options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=0, max_task_retries=0,
            max_concurrency=4, scheduling_strategy=NodeAffinitySchedulingStrategy(spec.node_id, soft=False),
            runtime_env={"env_vars": env},
        ).remote(tuple(self.python_path))
        h.conn = RayConn(self, h)
        h.take_ref, h.seq = None, 0
        self.starting(h, 0)  # the actor's pid comes with its Up

    def free_memory(self) -> dict[str, int]:
        """{lane: free bytes} as each actor measures on its machine (starting actors as needed);
        a lane that does not answer within the start timeout is left out."""
        import ray

        self.ensure_started()
        cpu_lanes = collections.Counter(s.node_id for s in self.specs if s.device == "cpu")
        refs = {h.name: h.actor.free_memory.remote(h.spec.device, cpu_lanes[h.spec.node_id])
                for h in self.handles if h.actor is not None}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = int(ray.get(ref, timeout=START_TIMEOUT_S))
            except Exception as e:  # its death shows in the job as any other
                log.warning("parallel_vae: Ray lane %s did not report its free memory: %s", name,
                            str(e).splitlines()[0][:200])
        return out

    def died(self, h: RayHandle, death: Death = Death.CRASHED, cause: str = "") -> None:
        if h.state is WorkerState.DEAD:
            h.cause = cause or h.cause
            return
        h.kill()
        h.actor, h.take_ref, h.conn = None, None, None
        h.cause, h.death, h.state = cause or "its actor died", death, WorkerState.DEAD
        shm.release(h.arena)
        h.arena = None
        self.stats.events.append((time.time(), f"{h.name} (pid {h.pid}) died: {h.cause}"))
        log.warning("parallel_vae: Ray worker %s (pid %d) died: %s", h.name, h.pid, h.cause)

    def report(self) -> list[dict]:
        """The route's rows, with each actor's machine."""
        rows = super().report()
        for row, h in zip(rows, self.handles):
            row["node"] = h.spec.node_ip
        return rows

    def rss_mib(self, h: RayHandle) -> None:
        return None  # the actor's memory is on its own machine, not readable here

    def stop_all(self) -> None:
        _stop_actors(self.handles, self._shared)

    # -- records ------------------------------------------------------------------------------------
    def _receive(self, timeout: float) -> list:
        import ray

        out = []
        for h in self.handles:
            if h.state is WorkerState.STARTING and time.monotonic() - h.started_at > START_TIMEOUT_S:
                self.died(h, Death.START_TIMEOUT, f"did not start within {START_TIMEOUT_S:.0f} s")
                out.append((h, None))
        live = [h for h in self.handles if h.live and h.actor is not None]
        if not live:
            time.sleep(timeout)
            return out
        for h in live:
            if h.take_ref is None:
                h.take_ref = h.actor.take.remote(TAKE_S)
        by_ref = {h.take_ref: h for h in live}
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ready:
            h = by_ref[ref]
            h.take_ref = None
            try:
                node_id, items = ray.get(ref)
            except Exception as e:  # RayActorError, ActorUnschedulableError: the actor or its node is gone
                # its machine left the cluster: starting it there again cannot help (the next
                # prompt's lanes are the machines that are left)
                gone = isinstance(e, ray.exceptions.ActorUnschedulableError)
                self.died(h, Death.START_FAILED if gone else Death.CRASHED,
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                out.append((h, None))
                continue
            for wire, payload in items:
                try:
                    record = msgs.parse(wire)
                except msgs.ProtocolError as e:
                    self.died(h, Death.CRASHED, f"sent a message the pool cannot read: {e}")
                    out.append((h, None))
                    break
                if isinstance(record, msgs.InitFailed):
                    self.died(h, Death.START_FAILED, f"could not start: {record.message}")
                    out.append((h, None))
                    break
                if isinstance(record, msgs.Up):
                    h.pid = record.pid
                if isinstance(record, msgs.Result) and payload is not None and h.arena is not None:
                    self._write(h, record, *payload)
                    self.result_nodes[node_id] += 1
                out.append((h, record))
        return out


__all__ = ["RayWorkerSpec", "RayWorkers"]
