"""Boot the real ComfyUI package in this process and import the pack the way ComfyUI does."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_MODULE = "parallel_tiled_vae"


RUNTIME_ENV = "PVAE_COMFYUI"  # the ComfyUI tree for this run (pytest --comfyui sets it)


def comfy_root() -> Path:
    """The ComfyUI tree the tests run against: $PVAE_COMFYUI (pytest --comfyui), else
    $COMFYUI_DIR, else the default runtime setup.sh made (.comfyui)."""
    root = Path(os.environ.get(RUNTIME_ENV) or os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
    if not (root / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {root}: run `make setup` (or set COMFYUI_DIR)")
    return root


def comfy_version(root: Path | None = None) -> str:
    """The version a ComfyUI tree declares (comfyui_version.py), read without importing it."""
    text = ((root or comfy_root()) / "comfyui_version.py")
    for line in text.read_text().splitlines() if text.is_file() else ():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def runtime_label(root: Path | None = None) -> str:
    root = root or comfy_root()
    return f"ComfyUI {comfy_version(root)} at {root}"


def boot(cpu: bool = True):
    """Import ComfyUI's ``nodes`` module with CPU mode set first.

    ``comfy.model_management`` probes the torch device at import, so ``args.cpu`` must be set
    before anything imports it. Idempotent.
    """
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    import comfy.model_management  # noqa: F401  (device probe happens here)
    import nodes

    return nodes


def load_pack():
    """Import the repository as a package under a fixed name, as ComfyUI's loader does by path.

    Our ``nodes/`` subpackage must never shadow ComfyUI's top-level ``nodes`` module, so the pack
    is only ever imported as a package.
    """
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    boot()
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    # Register the nodes through the pack's own entrypoint, as ComfyUI does.
    import asyncio

    asyncio.run(module.comfy_entrypoint())
    return module


def node_clone(node_cls, hidden: dict):
    """The class clone ComfyUI's executor runs a V3 node on, with its hidden inputs
    ({"UNIQUE_ID": ..., "PROMPT": ...}): 0.3.75 takes the hidden dict, 0.33 a V3Data dict holding it."""
    import inspect

    first = next(iter(inspect.signature(node_cls.PREPARE_CLASS_CLONE).parameters))
    return node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if first == "v3_data" else hidden)
