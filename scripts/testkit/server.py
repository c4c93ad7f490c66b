"""A real headless ComfyUI server (main.py --cpu) with the pack installed, driven over HTTP and
websocket the way the editor and API clients drive it."""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import requests

from .comfy_env import REPO, comfy_root

PACK_DIRNAME = "parallel_tiled_vae"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_command(port: int, base: Path, cpu: bool = True, extra_args: tuple = ()) -> list[str]:
    """main.py on 127.0.0.1 with every writable path under ``base`` (the database in memory)."""
    cmd = [sys.executable, str(comfy_root() / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    return cmd + (["--cpu"] if cpu else []) + list(extra_args)


def prepare_base(base: Path) -> Path:
    """ComfyUI's --base-directory layout with the pack linked into custom_nodes/."""
    for sub in ("custom_nodes", "models/vae", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIRNAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


def _with_tile_step(prompt: dict, step: int) -> dict:
    """``prompt`` with every Parallel Tiled VAE Decode node's tile_size ``step`` steps of 32 larger."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"].startswith("ParallelVAEDecode"):
            node["inputs"]["tile_size"] = node["inputs"].get("tile_size", 512) + 32 * step
    return prompt


class ComfyServer:
    def __init__(self, base: Path, port: Optional[int] = None, extra_args: tuple = (), env: Optional[dict] = None):
        self.base = prepare_base(Path(base))
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})  # extra environment for the server (and its workers)
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.base / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "ComfyServer":
        cmd = comfy_command(self.port, self.base, cpu=True, extra_args=("--disable-api-nodes", *self.extra_args))
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(self.base), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self, grace: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace)
        self._log.close()
        self.proc = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- HTTP ---------------------------------------------------------------------------
    def get(self, path: str, **kw):
        return requests.get(f"{self.url}{path}", timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, payload: dict, **kw):
        return requests.post(f"{self.url}{path}", json=payload, timeout=kw.pop("timeout", 30), **kw)

    def warm_workers(self, prompt: dict, count: int, tries: int = 5) -> None:
        """Run ``prompt`` until the route shows ``count`` workers up, each holding a VAE. A prompt
        ships the VAE to the workers that are up when it runs: on a cold start a worker still
        starting may come up after a small prompt ended and hold nothing until the next one. Each
        try asks for a larger tile (one tile all the same on a small latent): ComfyUI would answer
        the same prompt from its cache without running the node."""
        rows = []
        for i in range(tries):
            run = self.run(_with_tile_step(prompt, i))
            assert run.ok, run.error or run.response
            deadline = time.monotonic() + 15.0  # the load the prompt sent may still be running
            while time.monotonic() < deadline:
                rows = self.get("/parallel_vae/workers").json()["workers"]
                if len(rows) == count and all(r["state"] == "up" and r["models"] and not r["loading"]
                                              for r in rows):
                    return
                if len(rows) == count and all(r["state"] == "up" and not r["loading"] for r in rows):
                    break  # up, not loading, some without a VAE: the next prompt ships it
                time.sleep(0.1)
        raise AssertionError(f"workers not warm after {tries} prompts: {rows}")

    def object_info(self, node: str) -> dict:
        r = self.get(f"/object_info/{node}")
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict, client_id: Optional[str] = None) -> requests.Response:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})

    def run(self, prompt: dict, timeout: float = 600, on_message=None) -> "PromptRun":
        """Queue ``prompt`` and follow it over the websocket until it ends (any way it ends).

        ``on_message(msg)`` sees every message as it arrives (e.g. to press interrupt mid-run)."""
        import websocket

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)
        try:
            ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            r = self.queue(prompt, client_id)
            if r.status_code != 200:
                return PromptRun(None, r.status_code, r.json(), [], {})
            prompt_id = r.json()["prompt_id"]
            messages = []
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    frame = ws.recv()
                except websocket.WebSocketTimeoutException:
                    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")
                now = time.monotonic()
                if isinstance(frame, bytes):
                    messages.append({"type": "binary", "event": int.from_bytes(frame[:4], "big"),
                                     "payload": frame[4:], "t": now})
                    if on_message is not None:
                        on_message(messages[-1])
                    continue
                msg = json.loads(frame)
                msg["t"] = now  # arrival time, for per-node timings
                messages.append(msg)
                if on_message is not None:
                    on_message(msg)
                data = msg.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if msg["type"] in ("execution_error", "execution_interrupted"):
                    break
                if msg["type"] == "executing" and data.get("node") is None:
                    break
            history = self.get(f"/history/{prompt_id}").json().get(prompt_id, {})
            return PromptRun(prompt_id, 200, r.json(), messages, history)
        finally:
            ws.close()


class PromptRun:
    def __init__(self, prompt_id, http_status, response, messages, history):
        self.prompt_id = prompt_id
        self.http_status = http_status
        self.response = response
        self.messages = messages
        self.history = history

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]

    @property
    def error(self) -> Optional[dict]:
        errors = self.of_type("execution_error")
        return errors[0]["data"] if errors else None

    @property
    def ok(self) -> bool:
        return self.http_status == 200 and self.error is None and not self.of_type("execution_interrupted") \
            and self.history.get("status", {}).get("status_str") == "success"

    def outputs(self, node_id: str) -> dict:
        return self.history.get("outputs", {}).get(node_id, {})

    def node_seconds(self, node_id: str) -> float:
        """Time from ``executing`` this node to the next ``executing`` message (client clock)."""
        execs = [m for m in self.of_type("executing") if m["data"].get("prompt_id") == self.prompt_id]
        for i, m in enumerate(execs[:-1]):
            if m["data"].get("node") == node_id:
                return execs[i + 1]["t"] - m["t"]
        raise KeyError(f"node {node_id} did not run in prompt {self.prompt_id}")

    def progress_texts(self, node_id: str) -> list[str]:
        """ComfyUI's binary TEXT events (progress text) addressed to ``node_id``."""
        texts = []
        for m in self.of_type("binary"):
            if m["event"] == 3:
                n = int.from_bytes(m["payload"][:4], "big")
                if m["payload"][4:4 + n].decode() == node_id:
                    texts.append(m["payload"][4 + n:].decode())
        return texts


def saved_images(server: ComfyServer, run: PromptRun, node_id: str):
    """The PNGs a SaveImage node wrote, as one int16 array [N, H, W, 3] (ready for differences)."""
    import numpy as np

    from .latents import read_png

    files = run.outputs(node_id).get("images", [])
    if not files:
        raise AssertionError(f"node {node_id} saved no images; outputs: {run.history.get('outputs')}")
    return np.stack([read_png(server.base / "output" / f["subfolder"] / f["filename"]) for f in files])
