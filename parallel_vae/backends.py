"""Where a decode runs: one Backend per ``devices`` value, chosen once per prompt (nodes/backends.py).

Every backend answers the same calls, so nothing above them asks which one it holds:
  lanes          the names of its members (cpu, cuda:1, cpu[0], 10.0.0.7/cuda:0): a lane is a
                 named member of a backend, and nothing else
  free_bytes()   each lane's free memory (one measurement round; tile_size 0 sizes from it)
  speeds()       each lane's measured speed in exact bands, relative to the others
  exact_terms()  each lane's terms for exact rows (exact/shares.py), or none where one lane
                 decodes every band in turn
  costs(model)   what the lanes measured for a model (gate.py chooses how many to use)
  only(lanes)    the same backend on some of its lanes
  results(...)   every unit of a plan once, as units.Decoded, decoded with a ``Model``
  release()      give back what the lanes hold (ComfyUI's "free"); the next decode starts again
  report()       what the /parallel_vae/workers route shows

``InProcess`` decodes in the calling thread on ComfyUI's own device; ``LocalWorkers`` and
``RayLanes`` are a WorkerPool over local processes or Ray actors. The ComfyUI-specific parts (how
to build the VAE here, what ComfyUI counts as free) come in as plain callables from nodes/.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch

from . import schedule, sizing, units
from .devices import Device
from .errors import DecodeError
from .exact.shares import Terms
from .gate import Costs
from .plan import Plan
from .pool import WorkerPool
from .rates import Speeds, model_key
from .units import Decoded, Work
from .workers import ModelSource

# exact decodes in ComfyUI's process, by device and model (kept across prompts: the gate compares
# them with the workers' rates)
LOCAL_SPEEDS = Speeds()
# before a round trip is measured: a local pipe to the parent and back, and a Ray message
ROUND_PRIOR_S = {"local": 0.005, "ray": 0.03}
START_S = {"local": 0.05, "ray": 0.3}  # a job's fixed cost on workers: the latent out, the last result back


@dataclass
class Local:
    """A VAE made ready in this process: its decoder (which also encodes whole tiles), its exact
    band executor for a direction (made on first use), the context each call runs in, and how to
    give cached device memory back."""

    decoder: object
    executor: Callable[[str], object]
    context: Callable[[], ContextManager] = contextlib.nullcontext
    empty_cache: Callable[[], None] = lambda: None


@dataclass
class Model:
    """The VAE as every backend takes it: ``source`` for workers (weights and a rebuild recipe),
    ``local(torch_device, plan)`` for this process (built and loaded on first use)."""

    source: ModelSource
    local: Callable[[str, Plan], Local]


class Backend:
    lanes: list[str]
    note = ""  # for the progress text: "in-process", "2 worker processes", "2 Ray lanes"

    def free_bytes(self) -> dict[str, int]:
        raise NotImplementedError

    def speeds(self) -> dict[str, float]:
        return dict.fromkeys(self.lanes, 1.0)

    def exact_terms(self, band_rows: int, max_rows: Optional[dict[str, int]] = None) -> list[Terms]:
        """Each lane's terms for exact rows: its speed, the most rows of one band, and with
        ``max_rows`` (tile_size auto, from each lane's free memory) the rows it holds."""
        speeds = self.speeds()
        if max_rows is None:
            return [Terms(name, speeds[name], None, band_rows) for name in self.lanes]
        return [Terms(name, speeds[name], max_rows[name], max_rows[name]) for name in self.lanes]

    def results(self, plan: Plan, latent: torch.Tensor, model: Model, order: str = "tile",
                poll: Callable[[], None] = lambda: None) -> Iterator[Decoded]:
        raise NotImplementedError

    def costs(self, model: str, local_device: str) -> Costs:
        """What is known of these lanes' speeds on ``model``, and of in-process decodes on
        ``local_device`` (one lane: nothing to choose)."""
        return Costs({}, LOCAL_SPEEDS.of(model).get(local_device), ROUND_PRIOR_S["local"], 0.0)

    def only(self, lanes: Sequence[str]) -> "Backend":
        return self if list(lanes) == list(self.lanes) else Subset(self, lanes)

    def release(self) -> int:
        """Give back what the lanes hold; how many workers were running."""
        return 0

    def report(self) -> dict:
        return {"lanes": list(self.lanes)}


class InProcess(Backend):
    """One lane: ComfyUI's own process, on ``device``; ``free(torch_device)`` is what ComfyUI
    counts as free there (it could free more by unloading models)."""

    def __init__(self, device: Device, free: Callable[[str], int]):
        self.device, self.free = device, free
        self.lanes = [device.name]
        self.note = "in-process"

    def free_bytes(self) -> dict[str, int]:
        return {self.device.name: sizing.free_bytes(self.device, own=self.free(self.device.torch_device))}

    def exact_terms(self, band_rows: int, max_rows: Optional[dict[str, int]] = None) -> list[Terms]:
        return []  # one lane decodes every band in turn: bands are sized by tile_size alone

    def results(self, plan: Plan, latent: torch.Tensor, model: Model, order: str = "tile",
                poll: Callable[[], None] = lambda: None) -> Iterator[Decoded]:
        """The model is made ready here, in the caller's thread (ComfyUI loads it on its device);
        the units follow as the caller iterates."""
        local = model.local(self.device.torch_device, plan)
        executor = local.executor(plan.direction) if plan.exact else None
        return self._units(plan, latent, local, executor, order, poll, getattr(model.source, "fingerprint", ""))

    def _units(self, plan: Plan, latent: torch.Tensor, local: Local, executor, order: str,
               poll: Callable[[], None], model: str = "") -> Iterator[Decoded]:
        work, pid, name = Work.of(plan), os.getpid(), self.device.name
        started = time.monotonic()
        for group in schedule.in_process_groups(plan, order):
            decoded = units.run(work, latent, group, local.decoder, executor, poll=poll,
                                   empty_cache=local.empty_cache)
            while True:
                with local.context():
                    unit = next(decoded, None)
                if unit is None:
                    break
                tile, step, pixels = unit
                yield Decoded(name, plan.tiles[tile], step, pixels, pid)
        if plan.exact and model:  # the gate's in-process rate: positions per second, all included
            positions = sum(math.prod(t.in_size) for t in plan.tiles)
            LOCAL_SPEEDS.rated(name, positions, time.monotonic() - started, model_key(model, plan.direction))


class WorkerLanes(Backend):
    """Lanes that are a WorkerPool's workers, one per lane."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.lanes = pool.names

    def speeds(self) -> dict[str, float]:
        return self.pool.speeds.relative(self.lanes)

    def results(self, plan: Plan, latent: torch.Tensor, model: Model, order: str = "tile",
                poll: Callable[[], None] = lambda: None) -> Iterator[Decoded]:
        return self.pool.run(plan, latent, model.source, poll, order=order)

    transport = "local"

    def costs(self, model: str, local_device: str) -> Costs:
        speeds = self.pool.speeds
        cpu = sum(name.startswith("cpu") for name in self.lanes)
        return Costs(speeds.of(model), LOCAL_SPEEDS.of(model).get(local_device),
                     speeds.round_s if speeds.round_s is not None else ROUND_PRIOR_S[self.transport],
                     START_S[self.transport], cpu_lanes=cpu)

    def release(self) -> int:
        return self.pool.release()

    def report(self) -> dict:
        return {"devices": self.pool.names, **self.pool.report()}

    def shutdown(self) -> None:
        self.pool.shutdown()


class LocalWorkers(WorkerLanes):
    """Worker processes on this machine, one per device of ``devices``."""

    def __init__(self, devices: Sequence[Device], pool: WorkerPool):
        super().__init__(pool)
        self.devices = list(devices)
        count = len(self.devices)
        self.note = f"{count} worker process{'es' if count > 1 else ''}"

    def free_bytes(self) -> dict[str, int]:
        """Measured here (they share this machine): CUDA's free memory on each GPU, or each CPU
        worker's share of the available RAM."""
        on_cpu = sum(d.kind == "cpu" for d in self.devices)
        return {d.name: sizing.free_bytes(d, on_cpu) for d in self.devices}


class RayLanes(WorkerLanes):
    """Ray actors on the cluster's machines (ray_workers.py), one per lane."""

    transport = "ray"

    def __init__(self, pool: WorkerPool):
        super().__init__(pool)
        self.note = f"{len(self.lanes)} Ray lane{'s' if len(self.lanes) > 1 else ''}"

    def free_bytes(self) -> dict[str, int]:
        """As each actor measures on its machine (starting the actors), under the environment's
        limit for that lane's name; a lane that does not answer is sized like the tightest one."""
        measured = self.pool.transport.free_memory(self.pool.start())
        if not measured:
            raise DecodeError(f"no Ray lane reported its free memory for tile_size 0 (auto) ({', '.join(self.lanes)}); "
                              "give a tile size, and see ComfyUI's log for why")
        tightest = min(measured.values())
        return {name: sizing.capped(name, measured.get(name, tightest)) for name in self.lanes}


class Subset(Backend):
    """Some of a backend's lanes (gate.py chose them): exact rows go to these alone; the others
    stay idle for this job."""

    def __init__(self, whole: Backend, lanes: Sequence[str]):
        self.whole = whole
        self.lanes = list(lanes)
        self.note = f"{len(self.lanes)} of {whole.note}"

    def free_bytes(self) -> dict[str, int]:
        frees = self.whole.free_bytes()
        return {name: frees[name] for name in self.lanes}

    def speeds(self) -> dict[str, float]:
        every = self.whole.speeds()
        return {name: every[name] for name in self.lanes}

    def results(self, plan: Plan, latent: torch.Tensor, model: Model, order: str = "tile",
                poll: Callable[[], None] = lambda: None) -> Iterator[Decoded]:
        return self.whole.results(plan, latent, model, order, poll)

    def costs(self, model: str, local_device: str) -> Costs:
        return self.whole.costs(model, local_device)

    def report(self) -> dict:
        return self.whole.report()


__all__ = ["Backend", "Subset", "InProcess", "Local", "LocalWorkers", "Model", "RayLanes", "WorkerLanes"]
