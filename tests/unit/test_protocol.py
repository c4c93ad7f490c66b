"""The parent <-> worker messages: every record survives its wire form, the wire form is plain
data a worker can unpickle, bad messages are clear errors, and the modules import one way."""
from __future__ import annotations

import ast
import pickle
from dataclasses import dataclass, fields
from multiprocessing import Pipe
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from parallel_vae import protocol
from parallel_vae.protocol import Failure, LoadFailure, ProtocolError
from parallel_vae.units import Work

EXAMPLES = [
    protocol.Init({"name": "cpu[0]", "device": "cpu", "threads": 2, "setup": [("m", "a.b", True)], "imports": []}),
    protocol.Load("fp", {"factory": "m:f", "kwargs": {"dtype": torch.float16}}, "pvae_1_w_ab", 4096,
                  [("k", torch.float32, (2, 3), 0)]),
    protocol.Arena("pvae_1_slots_cd", 1024, 512, 2),
    protocol.JobData(7, "fp", Work(False, False, ((0, 1),), ((0, (0, 0), (8, 8)),)).wire(), "pvae_1_z_ef", 256,
                     torch.float32, (1, 4, 8, 8)),
    protocol.Task(7, 3, (3, 4)),
    protocol.Task(7, 3, (3,), 2),
    protocol.Free(1),
    protocol.Cancel(7),
    protocol.Quit(),
    protocol.Drop(),
    protocol.Idle(123 << 20, ()),
    protocol.Idle(123 << 20, ("fp", "other")),
    protocol.Idle(1 << 20, (), True),
    protocol.Up(1234),
    protocol.InitFailed("RuntimeError: no such device"),
    protocol.Loaded("fp", 1.5, ("other", "fp")),
    protocol.LoadFailed("fp", "it is another model", LoadFailure.MISMATCH, ()),
    protocol.LoadFailed("fp", "KeyError: x", LoadFailure.ERROR, ("other",)),
    protocol.Result(7, 3, 0, 1, (1, 3, 64, 64)),
    protocol.Done(7, 3),
    *[protocol.Failed(7, 3, why, "text") for why in Failure],
    protocol.GroupStats(7, 3, 0, "up.0.norm1", 1e-6, [(64, b"\x00" * 16, b"\x00" * 16, (1, 2, 1))]),  # Moments.as_wire
    protocol.SharedStats(7, 0, b"\x00" * 16, b"\x00" * 16, (1, 2)),
    protocol.GroupRows(7, 3, 1, "conv1", (b"\x00" * 8, (1, 2, 1, 1), "float32"),
                       (b"\x00" * 8, (1, 2, 1, 1), "float32")),
    protocol.SharedRows(7, 1, None, (b"\x00" * 8, (1, 2, 1, 1), "float32")),
    protocol.GroupPart(7, 3, 2, "attn", (b"\x00" * 8, (1, 2, 1, 1), "float32")),
    protocol.SharedWhole(7, 2, (b"\x00" * 16, (1, 2, 2, 1), "float32")),
]


def test_the_examples_cover_every_record_of_the_protocol():
    own = {cls for cls in protocol._KINDS.values() if cls.__module__ == protocol.__name__}
    assert own == {type(r) for r in EXAMPLES}


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: f"{r.kind}-{getattr(r, 'why', '')}")
def test_every_record_round_trips_through_its_plain_wire_form(record):
    wire = record.wire()
    assert type(wire) is tuple and wire[0] == record.kind and len(wire) == 1 + len(fields(record))
    sent = pickle.dumps(wire)
    assert b"parallel_vae" not in sent and b"protocol" not in sent, "a worker could not unpickle it"
    back = protocol.parse(pickle.loads(sent))
    assert back == record and type(back) is type(record)
    for f in fields(record):
        assert type(getattr(back, f.name)) is type(getattr(record, f.name))  # enums come back as enums


def test_records_travel_over_a_connection():
    a, b = Pipe()
    for record in EXAMPLES:
        protocol.send(a, record)
        assert protocol.recv(b) == record


def test_fields_are_read_by_name():
    failed = protocol.parse(("failed", 7, 3, "oom", "out of memory"))
    assert (failed.job_id, failed.key, failed.why, failed.message) == (7, 3, Failure.OOM, "out of memory")


@pytest.mark.parametrize("msg, error", [
    (("stats", 1, 2), r"unknown message kind 'stats' \(known: .*result"),
    (("task", 1, 2), r"'task' message has 2 fields, expected 4 \(job_id, key, tiles, threads\)"),
    (("failed", 1, 2, "melted", "x"), r"'failed' message: 'melted' is not a valid Failure"),
    ("result", "not a message"),
    ((), "not a message"),
    ((3, 1), "not a message"),
])
def test_a_bad_message_is_a_clear_error(msg, error):
    with pytest.raises(ProtocolError, match=error):
        protocol.parse(msg)


def test_a_job_kind_can_register_records_of_its_own():
    @protocol.register
    @dataclass(frozen=True)
    class Probe(protocol.Record):
        kind: ClassVar[str] = "test-probe"
        job_id: int
        why: Failure

    try:
        assert protocol.parse(Probe(1, Failure.OOM).wire()) == Probe(1, Failure.OOM)
        with pytest.raises(ValueError, match="already Probe"):
            protocol.register(dataclass(frozen=True)(type("Other", (protocol.Record,), {"kind": "test-probe"})))
    finally:
        protocol._KINDS.pop("test-probe")


def test_a_worker_refuses_an_unknown_message_instead_of_looping():
    from parallel_vae.worker import Worker

    parent, child = Pipe()
    worker = Worker(child)
    parent.send(("bogus", 1))
    with pytest.raises(ProtocolError, match="unknown message kind 'bogus'"):
        worker.serve()
    protocol.send(parent, protocol.Up(1))  # a record only workers send
    with pytest.raises(ProtocolError, match="does not take Up records"):
        worker.serve()
    protocol.send(parent, protocol.Free(0))
    protocol.send(parent, protocol.Quit())
    worker.serve()
    assert worker.free_slots == [0]


ENGINE = Path(protocol.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ENGINE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def _imports(path: Path, module: str, toplevel_only: bool) -> set[str]:
    """The pack's modules ``module`` imports (``parallel_vae.`` left off), by its source; with
    ``toplevel_only``, only what it imports when it is imported (not inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if toplevel_only else list(ast.walk(tree))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in nodes:
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
        elif (node.module or "").startswith("parallel_vae"):
            target = node.module[len("parallel_vae"):].lstrip(".")
        else:
            continue
        names = [target] if node.module else [".".join(filter(None, [target, a.name])) for a in node.names]
        for name in names + [f"{target}.{a.name}" for a in node.names]:
            if name in MODULES:
                found.add(name)
    return found - {module}


MODULES = {_module_name(p) for p in ENGINE.rglob("*.py")}
GRAPH = {m: _imports(p, m, False) for p in ENGINE.rglob("*.py") for m in [_module_name(p)]}
AT_IMPORT = {m: _imports(p, m, True) for p in ENGINE.rglob("*.py") for m in [_module_name(p)]}


def _reach(start: str, graph: dict) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_the_import_reader_sees_what_the_modules_import():
    """The checks below are only as good as the reader: known imports, function-level ones too."""
    assert {"protocol", "errors", "families", "units", "shm", "identity"} <= GRAPH["worker"]
    assert "exact.lockstep" in GRAPH["worker"] - AT_IMPORT["worker"] or "exact.lockstep" in _reach("worker", GRAPH)
    assert {"blend", "units", "plan", "errors"} <= GRAPH["engine"]


def test_the_worker_process_loads_neither_the_decode_loop_nor_the_pool():
    """A worker needs the protocol, the units it decodes and the families' adapters; never the
    blender, the scheduler, the pool or the backends (it would load them into every worker)."""
    parent_side = {"engine", "blend", "schedule", "stream", "video", "pool", "jobs", "lockstep_job", "workers",
                   "processes", "ray_workers", "backends", "sizing", "devices"}
    assert _reach("worker", GRAPH) & parent_side == set()


def test_the_pool_side_does_not_import_the_decode_loop():
    for module in ("pool", "jobs", "lockstep_job", "workers", "processes", "ray_workers"):
        assert not _reach(module, GRAPH) & {"engine", "blend"}, module


def test_the_engine_has_no_import_circle():
    circles = [m for m in AT_IMPORT if m in _reach(m, AT_IMPORT)]
    assert circles == []
