"""make run: ComfyUI with the pack for the browser, on 127.0.0.1:PORT.

Uses demo-output/comfy-base as ComfyUI's base directory, with every example workflow's files in
place (random-weight VAEs, latents, an image), so each of the pack's templates runs as soon as it is
opened; parallel_vae_wan_i2v needs your Wan 2.1 models. Put your own models in
demo-output/comfy-base/models/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testkit import demo_assets  # noqa: E402
from testkit.comfy_env import REPO  # noqa: E402
from testkit.server import comfy_command  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8188)
    args = ap.parse_args()
    base = REPO / "demo-output" / "comfy-base"
    demo_assets.prepare_templates(base)
    import torch

    cmd = comfy_command(args.port, base, cpu=not torch.cuda.is_available())
    print(f"ComfyUI with the pack: http://127.0.0.1:{args.port}  (base directory {base})", flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
