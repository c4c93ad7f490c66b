"""``parallel_vae`` must never import ComfyUI: it is the engine workers and tests use on their own."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import parallel_vae

ENGINE = Path(parallel_vae.__file__).parent


def test_no_engine_module_imports_comfy_in_its_source():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ENGINE)}: {n}" for n in names
                          if n.split(".")[0] in {"comfy", "comfy_api", "comfy_execution", "nodes", "folder_paths",
                                                 "server", "execution"}]
    assert offenders == []


def test_importing_every_engine_module_loads_no_comfy_module():
    modules = [m.name for m in pkgutil.walk_packages([str(ENGINE)], "parallel_vae.")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes'))\n"
            "print(len(sys.modules)); assert not bad, bad\n")
    # A clean interpreter: the test process itself may have ComfyUI loaded by other tests.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert len(modules) >= 10
