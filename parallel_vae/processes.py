"""Workers as local processes: ``python -m parallel_vae.worker`` (never by re-running ComfyUI),
one socket each for the records, and a death pipe so each exits when its parent dies.

Every wait is a short ``multiprocessing.connection.wait`` on the workers' sockets, so a dead
worker is seen at once (its socket reaches end of file); no signal handlers are installed
anywhere. Stopping asks politely (Quit, the death pipe closed), then SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Optional, Sequence

from . import protocol as msgs
from .heap import TUNABLES_ENV, worker_tunables
from .workers import PACKAGE_ROOT, Channel, Death, Lost, Transport, WorkerSpec

log = logging.getLogger("parallel_vae")

STOP_GRACE_S = (2.0, 3.0)  # quit -> SIGTERM -> SIGKILL


def _read_stderr(pipe, sink: collections.deque, name: str) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        sink.append(line)
        log.debug("parallel_vae worker %s: %s", name, line)
    pipe.close()


def rss_mib(pid: int) -> Optional[float]:
    """A process's resident memory, read from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(kib / 1024, 1)
    except (OSError, StopIteration, ValueError):
        return None


class Process(Channel):
    """One worker process: its socket, its death pipe, the last lines of its stderr."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, death_w: int, name: str):
        self.proc, self.conn, self.death_w = proc, conn, death_w
        self.pid = proc.pid
        self.stderr: collections.deque = collections.deque(maxlen=40)
        threading.Thread(target=_read_stderr, args=(proc.stderr, self.stderr, name), daemon=True,
                         name=f"pvae-stderr-{name}").start()

    def send(self, record: msgs.Record) -> None:
        if self.conn is None:
            return
        try:
            msgs.send(self.conn, record)
        except (OSError, ValueError):  # it died; the wait loop will see the end of file
            pass

    def kill(self) -> None:
        self.proc.kill()

    def hang_up(self) -> None:
        """Ask it to go: Quit, and the death pipe closed (it exits even mid-decode)."""
        self.send(msgs.Quit())
        if self.death_w is not None:
            try:
                os.close(self.death_w)
            except OSError:
                pass
            self.death_w = None

    def end(self) -> str:
        code = self.proc.poll()
        if code is None:
            try:
                code = self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(5)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.death_w is not None:
            os.close(self.death_w)
            self.death_w = None
        cause = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = [line for line in self.stderr if line.strip()][-3:]
        return cause + (": " + " | ".join(tail) if tail else "")

    def row(self) -> dict:
        return {"rss_mib": rss_mib(self.pid)}


class Processes(Transport):
    """Worker processes on this machine; ``python_path`` comes first on their sys.path."""

    def __init__(self, python_path: Sequence[str] = ()):
        # The caller's paths first: the pack root also holds the ComfyUI glue package "nodes",
        # which must not shadow ComfyUI's own nodes module in a worker.
        self.python_path = [*python_path, PACKAGE_ROOT]

    def _env(self, spec: WorkerSpec) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(self.python_path + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONSAFEPATH"] = "1"  # no cwd on sys.path (Python 3.11+)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec.threads)
        tunables = worker_tunables(env)
        if tunables:
            env[TUNABLES_ENV] = tunables
        env.update(dict(spec.env))
        return env

    def spawn(self, spec: WorkerSpec) -> Process:
        parent_sock, child_sock = socket.socketpair()
        death_r, death_w = os.pipe()
        cmd = [sys.executable, "-m", "parallel_vae.worker", "--conn", str(child_sock.fileno()),
               "--death", str(death_r), "--name", spec.name]
        try:
            proc = subprocess.Popen(cmd, env=self._env(spec), pass_fds=(child_sock.fileno(), death_r),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, cwd=PACKAGE_ROOT, close_fds=True)
        except BaseException:
            parent_sock.close()
            os.close(death_w)
            raise
        finally:
            child_sock.close()
            os.close(death_r)
        return Process(proc, Connection(parent_sock.detach()), death_w, spec.name)

    def receive(self, channels: Sequence[Process], timeout: float):
        by_conn = {p.conn: p for p in channels if p.conn is not None}
        out = []
        for conn in wait(list(by_conn), timeout):
            p = by_conn[conn]
            records, lost = [], None
            try:
                while conn.poll(0):
                    records.append(msgs.recv(conn))
            except msgs.ProtocolError as e:  # a lost record would leave its tile waiting forever
                p.kill()
                lost = Lost(Death.CRASHED, f"sent a message the pool cannot read: {e}")
            except (EOFError, OSError):
                lost = Lost(Death.CRASHED, "")  # how it ended (exit status, stderr) says why
            out.append((p, records, lost))
        return out

    def stop(self, channels: Sequence[Process]) -> None:
        live = [p for p in channels if p.proc.poll() is None]
        for p in live:
            p.hang_up()
        for grace, sig in zip(STOP_GRACE_S, (signal.SIGTERM, signal.SIGKILL)):
            deadline = time.monotonic() + grace
            for p in live:
                try:
                    p.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            live = [p for p in live if p.proc.poll() is None]
            for p in live:
                try:
                    p.proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        for p in live:
            p.proc.wait(5)


__all__ = ["Process", "Processes", "STOP_GRACE_S", "rss_mib"]
