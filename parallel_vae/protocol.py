"""The messages between the pool (parent) and a worker, as named records.

Each record is a small frozen dataclass with a ``kind``; on the wire it travels as the plain
tuple ``(kind, *fields)`` with enums as their string values: a worker cannot unpickle the
pack's own classes, which live under a path-shaped module name inside ComfyUI. Both sides build
messages with ``send(conn, record)`` and read them with ``recv(conn)``/``parse(tuple)``, and every
other module reads a record's fields by name. In order, per worker:

  parent -> worker                                worker -> parent
  Init(config)                                    Up(pid) | InitFailed(message)
  Load(fingerprint, recipe, block, nbytes,        Loaded(fingerprint, seconds, models)
       manifest)                                  | LoadFailed(fingerprint, message, why, models)
  Arena(name, nbytes, slot_bytes, slots)
  JobData(job_id, fingerprint, work,              (no reply; work is units.Work in plain data)
          latent_block, latent_nbytes,
          latent_dtype, in_shape)
  Task(job_id, key, tiles, threads)               Result(job_id, tile, step, slot, shape)...,
                                                  then Done(job_id, key, busy_s)
                                                  | Failed(job_id, key, why, message)
  Free(slot)  Cancel(job_id)  Quit()
  Drop()                                          Idle(held, models, dropped=True)

The worker owns what it holds: ``models`` in Loaded, LoadFailed and Idle is the list of VAE
fingerprints it keeps built after that step (it drops the least recent to make room), and the
parent takes that list as it is.

A task is a group of tiles (usually one). A causal group is decoded frame by frame across its
tiles, each tile keeping its own causal cache, so a stream gets whole frames early. A Result's
pixels sit in the worker's arena slot until the parent sends Free(slot).

A job kind that needs messages of its own defines records here or in its own module with
``@record`` (both the parent and the worker must import that module before they meet one).
This module imports nothing of the pack, so worker.py and the parent share it as it is.
"""
from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, fields
from typing import Any, Optional


class ProtocolError(ValueError):
    """A message that is not a known record: a bug, or a worker from another version of the pack."""


class Failure(enum.Enum):
    """Why a task failed."""

    OOM = "oom"  # retried on another device, or once more where it failed
    ERROR = "error"
    CANCELLED = "cancelled"  # its job was cancelled or is gone: nothing to report


class LoadFailure(enum.Enum):
    """Why a worker could not build a model."""

    MISMATCH = "mismatch"  # it built another model than ComfyUI's (identity.signature differs)
    ERROR = "error"


_KINDS: dict[str, type["Record"]] = {}
_ENUM_FIELDS: dict[type, dict[str, type[enum.Enum]]] = {}


@dataclass(frozen=True)
class Record:
    kind: typing.ClassVar[str] = ""

    def wire(self) -> tuple:
        """The plain tuple that crosses the connection."""
        return (self.kind, *(_plain(getattr(self, f.name)) for f in fields(self)))

    def blocks(self) -> list[tuple[str, int]]:
        """(name, bytes) of the parent's shared-memory blocks this record names, for the worker to
        map (a transport without shared memory carries them along)."""
        return []


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def register(cls: type[Record]) -> type[Record]:
    """Make ``cls`` (a frozen dataclass with its ``kind``) known to ``parse``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} needs a kind")
    known = _KINDS.get(cls.kind)
    if known is not None and known is not cls:
        raise ValueError(f"message kind {cls.kind!r} is already {known.__name__}")
    _KINDS[cls.kind] = cls
    hints = typing.get_type_hints(cls)
    _ENUM_FIELDS[cls] = {f.name: hints[f.name] for f in fields(cls)
                         if isinstance(hints.get(f.name), type) and issubclass(hints[f.name], enum.Enum)}
    return cls


def record(kind: str):
    """Class decorator: ``@record("free") class Free(Record): slot: int`` makes a frozen dataclass
    record of that kind, known to ``parse``."""
    def make(cls):
        cls.kind = kind
        return register(dataclass(frozen=True)(cls))
    return make


def parse(msg: Any) -> Record:
    """The record a wire tuple stands for; ProtocolError names what is wrong with it."""
    if not isinstance(msg, tuple) or not msg or not isinstance(msg[0], str):
        raise ProtocolError(f"not a message: {msg!r:.200}")
    cls = _KINDS.get(msg[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind {msg[0]!r} (known: {', '.join(sorted(_KINDS))})")
    names = [f.name for f in fields(cls)]
    if len(msg) - 1 != len(names):
        raise ProtocolError(f"{msg[0]!r} message has {len(msg) - 1} fields, expected {len(names)} "
                            f"({', '.join(names)})")
    values = dict(zip(names, msg[1:]))
    try:
        for name, kind in _ENUM_FIELDS[cls].items():
            values[name] = kind(values[name])
    except ValueError as e:
        raise ProtocolError(f"{msg[0]!r} message: {e}") from None
    return cls(**values)


def send(conn, message: Record) -> None:
    conn.send(message.wire())


def recv(conn) -> Record:
    return parse(conn.recv())


# -- parent -> worker -----------------------------------------------------------------------------
@record("init")
class Init(Record):
    config: dict  # name, device, threads, setup, imports


@record("load")
class Load(Record):
    fingerprint: str
    recipe: dict  # see processes.ModelSource
    block: str  # shared-memory block holding the weights
    nbytes: int
    manifest: list  # shm.pack's (key, dtype, shape, offset)

    def blocks(self) -> list[tuple[str, int]]:
        return [(self.block, self.nbytes)]


@record("arena")
class Arena(Record):
    """Result slots: ``slots`` of ``slot_bytes`` each in the parent's block ``name``."""

    name: str
    nbytes: int
    slot_bytes: int
    slots: int


@record("job")
class JobData(Record):
    job_id: int
    fingerprint: str
    work: dict  # units.Work.wire()
    latent_block: str  # shared-memory block holding the latent
    latent_nbytes: int
    latent_dtype: Any  # a torch dtype (pickles by name)
    in_shape: tuple

    def blocks(self) -> list[tuple[str, int]]:
        return [(self.latent_block, self.latent_nbytes)]


@record("task")
class Task(Record):
    job_id: int
    key: int  # the group's index
    tiles: tuple
    threads: int = 0  # torch threads for this task (0: the worker's own); see jobs.Job.threads_for


@record("free")
class Free(Record):
    slot: int


@record("cancel")
class Cancel(Record):
    job_id: int


@record("quit")
class Quit(Record):
    pass


@record("drop")
class Drop(Record):
    """Forget every VAE and give memory back (the pool's idle timeout); answered with Idle."""


# -- worker -> parent -----------------------------------------------------------------------------
@record("up")
class Up(Record):
    pid: int


@record("init_failed")
class InitFailed(Record):
    message: str


@record("idle")
class Idle(Record):
    """The worker went idle and gave memory back: what it still holds on its device (CUDA:
    torch's reserved bytes; CPU: its resident set), and the VAEs it keeps built; ``dropped``: the
    answer to a Drop (sent after each job otherwise)."""

    held: int
    models: tuple
    dropped: bool = False


@record("loaded")
class Loaded(Record):
    fingerprint: str
    seconds: float  # 0.0: it was already built
    models: tuple  # every VAE it keeps built now, least recent first


@record("load_failed")
class LoadFailed(Record):
    fingerprint: str
    message: str
    why: LoadFailure
    models: tuple  # what it still keeps built


@record("result")
class Result(Record):
    job_id: int
    tile: int
    step: int
    slot: int
    shape: tuple


@record("done")
class Done(Record):
    job_id: int
    key: int
    busy_s: float = 0.0  # the task's time less its waits on lock-step partners (a device's speed)
    waited_s: float = 0.0  # its waits on lock-step partners, round trips included
    rounds: int = 0  # lock-step sync points it went through


@record("failed")
class Failed(Record):
    job_id: int
    key: int
    why: Failure
    message: str


# -- exact mode: GroupNorm statistics and conv edge rows in lock-step (lockstep_job.py) ----------
@record("gn")
class GroupStats(Record):
    """A task's bands reached GroupNorm ``k``: the moments of each band's own rows, in band order
    (exact.stats.Moments.as_wire). The worker waits for SharedStats before going on."""

    job_id: int
    key: int
    k: int
    name: str
    eps: float
    moments: list


@record("gn_all")
class SharedStats(Record):
    """The global (mean, rstd) of GroupNorm ``k``, float64 [B, G] as bytes, the same for every band."""

    job_id: int
    k: int
    mean: bytes
    rstd: bytes
    shape: tuple


@record("rows")
class GroupRows(Record):
    """A task's bands reached the conv at sync point ``k``: the top rows of its first band and the
    bottom rows of its last (exact.lockstep.rows_to_wire). The worker waits for SharedRows."""

    job_id: int
    key: int
    k: int
    name: str
    top: tuple
    bottom: tuple


@record("rows_all")
class SharedRows(Record):
    """What lies beyond a task's bands at sync point ``k``: the bottom rows of the group above and
    the top rows of the group below (None at the image's edge)."""

    job_id: int
    k: int
    above: Optional[tuple]
    below: Optional[tuple]


@record("part")
class GroupPart(Record):
    """A task's bands reached a layer that reads every row (exact encoding's mid-block attention):
    their rows of its input, concatenated (exact.lockstep.rows_to_wire). The worker waits for
    SharedWhole."""

    job_id: int
    key: int
    k: int
    name: str
    part: tuple


@record("whole")
class SharedWhole(Record):
    """Every group's part at sync point ``k``, in band order, as one tensor."""

    job_id: int
    k: int
    whole: tuple


SHARED = (SharedStats, SharedRows, SharedWhole)  # the parent's answers at a sync point
