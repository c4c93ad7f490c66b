"""Boot the real ComfyUI package in this process and import the pack the way ComfyUI does."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_MODULE = "parallel_tiled_vae"


def comfy_root() -> Path:
    """The ComfyUI tree the tests run against: $COMFYUI_DIR, else the one setup.sh made."""
    root = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
    if not (root / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI at {root}: run `make setup` (or set COMFYUI_DIR)")
    return root


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
