"""The messages between the pool (parent) and a worker process, as named records.

Each record is a small frozen dataclass with a ``kind``; on the wire it travels as the plain
tuple ``(kind, *fields)`` with enums as their string values: a worker cannot unpickle the
pack's own classes, which live under a path-shaped module name inside ComfyUI. Both sides build
messages with ``send(conn, record)`` and read them with ``recv(conn)``/``parse(tuple)``, so no code
reads a field by its position. In order, per worker:

  parent -> worker                                worker -> parent
  Init(config)                                    Up(pid) | InitFailed(message)
  Load(fingerprint, recipe, block, nbytes,        Loaded(fingerprint, seconds)
       manifest)                                  | LoadFailed(fingerprint, message, why)
  Arena(name, nbytes, slot_bytes, slots)
  JobData(job_id, fingerprint, plan, latent)      (no reply; plan is plain data, see jobs.wire_plan)
  Task(job_id, key, tiles)                        Result(job_id, tile, step, slot, shape)...,
                                                  then Done(job_id, key) | Failed(job_id, key, why, message)
  Free(slot)  Cancel(job_id)  Quit()

A task is a group of tiles (usually one). A causal group is decoded frame by frame across its
tiles, each tile keeping its own causal cache, so a stream gets whole frames early. A Result's
pixels sit in the worker's arena slot until the parent sends Free(slot).

A job kind that needs messages of its own defines records here or in its own module with
``@register`` (both the parent and the worker must import that module before they meet one).
This module imports nothing of the pack, so worker.py and the parent share it as it is.
"""
from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Optional

MAX_CACHED_VAES = 2  # VAEs a worker keeps built (least recently used goes first); the parent mirrors it


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
    kind: ClassVar[str] = ""

    def wire(self) -> tuple:
        """The plain tuple that crosses the connection."""
        return (self.kind, *(_plain(getattr(self, f.name)) for f in fields(self)))


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def register(cls: type[Record]) -> type[Record]:
    """Make ``cls`` known to ``parse`` by its ``kind`` (a class decorator)."""
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


def send(conn, record: Record) -> None:
    conn.send(record.wire())


def recv(conn) -> Record:
    return parse(conn.recv())


# -- parent -> worker -----------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class Init(Record):
    kind: ClassVar[str] = "init"
    config: dict  # name, device, threads, setup, imports


@register
@dataclass(frozen=True)
class Load(Record):
    kind: ClassVar[str] = "load"
    fingerprint: str
    recipe: dict  # see pool.ModelSource
    block: str  # shared-memory block holding the weights
    nbytes: int
    manifest: list  # shm.pack's (key, dtype, shape, offset)


@register
@dataclass(frozen=True)
class Arena(Record):
    """Result slots: ``slots`` of ``slot_bytes`` each in the parent's block ``name``."""

    kind: ClassVar[str] = "arena"
    name: str
    nbytes: int
    slot_bytes: int
    slots: int


@register
@dataclass(frozen=True)
class JobData(Record):
    kind: ClassVar[str] = "job"
    job_id: int
    fingerprint: str
    plan: dict
    latent: tuple  # (block name, nbytes, dtype, shape)


@register
@dataclass(frozen=True)
class Task(Record):
    kind: ClassVar[str] = "task"
    job_id: int
    key: int  # the group's index
    tiles: tuple
    threads: int = 0  # torch threads for this task (0: the worker's own); see jobs.Job.threads_for


@register
@dataclass(frozen=True)
class Free(Record):
    kind: ClassVar[str] = "free"
    slot: int


@register
@dataclass(frozen=True)
class Cancel(Record):
    kind: ClassVar[str] = "cancel"
    job_id: int


@register
@dataclass(frozen=True)
class Quit(Record):
    kind: ClassVar[str] = "quit"


@register
@dataclass(frozen=True)
class Drop(Record):
    """Forget every VAE and give memory back (the pool's idle timeout); answered with Idle."""

    kind: ClassVar[str] = "drop"


# -- worker -> parent -----------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class Up(Record):
    kind: ClassVar[str] = "up"
    pid: int


@register
@dataclass(frozen=True)
class InitFailed(Record):
    kind: ClassVar[str] = "init_failed"
    message: str


@register
@dataclass(frozen=True)
class Idle(Record):
    """The worker went idle and gave memory back: what it still holds on its device (CUDA:
    torch's reserved bytes; CPU: its resident set), and how many VAEs it keeps built."""

    kind: ClassVar[str] = "idle"
    held: int
    models: int


@register
@dataclass(frozen=True)
class Loaded(Record):
    kind: ClassVar[str] = "loaded"
    fingerprint: str
    seconds: float  # 0.0: it was already cached


@register
@dataclass(frozen=True)
class LoadFailed(Record):
    kind: ClassVar[str] = "load_failed"
    fingerprint: str
    message: str
    why: LoadFailure


@register
@dataclass(frozen=True)
class Result(Record):
    kind: ClassVar[str] = "result"
    job_id: int
    tile: int
    step: int
    slot: int
    shape: tuple


@register
@dataclass(frozen=True)
class Done(Record):
    kind: ClassVar[str] = "done"
    job_id: int
    key: int
    busy_s: float = 0.0  # the task's time less its waits on lock-step partners (a device's speed)


@register
@dataclass(frozen=True)
class Failed(Record):
    kind: ClassVar[str] = "failed"
    job_id: int
    key: int
    why: Failure
    message: str


# -- exact mode: GroupNorm statistics and conv edge rows in lock-step (lockstep_job.py) ----------
@register
@dataclass(frozen=True)
class GroupStats(Record):
    """A task's bands reached GroupNorm ``k``: the moments of each band's own rows, in band order
    (exact.stats.Moments.as_wire). The worker waits for SharedStats before going on."""

    kind: ClassVar[str] = "gn"
    job_id: int
    key: int
    k: int
    name: str
    eps: float
    moments: list


@register
@dataclass(frozen=True)
class SharedStats(Record):
    """The global (mean, rstd) of GroupNorm ``k``, float64 [B, G] as bytes, the same for every band."""

    kind: ClassVar[str] = "gn_all"
    job_id: int
    k: int
    mean: bytes
    rstd: bytes
    shape: tuple


@register
@dataclass(frozen=True)
class GroupRows(Record):
    """A task's bands reached the conv at sync point ``k``: the top rows of its first band and the
    bottom rows of its last (exact.lockstep.rows_to_wire). The worker waits for SharedRows."""

    kind: ClassVar[str] = "rows"
    job_id: int
    key: int
    k: int
    name: str
    top: tuple
    bottom: tuple


@register
@dataclass(frozen=True)
class SharedRows(Record):
    """What lies beyond a task's bands at sync point ``k``: the bottom rows of the group above and
    the top rows of the group below (None at the image's edge)."""

    kind: ClassVar[str] = "rows_all"
    job_id: int
    k: int
    above: Optional[tuple]
    below: Optional[tuple]
