"""make demo: decode the example workflow on a real headless ComfyUI and compare with VAEDecodeTiled.

Starts ComfyUI (CPU when there is no GPU) with the pack, posts example_workflows/
parallel_vae_decode_api.json to /prompt, then the same graph with VAE Decode (Tiled) in place of
Parallel Tiled VAE Decode, and prints where the images landed, how long each decode took, and the
largest pixel difference between the two.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testkit import demo_assets, prompts  # noqa: E402
from testkit.comfy_env import REPO  # noqa: E402
from testkit.server import ComfyServer, saved_images  # noqa: E402

BASE = REPO / "demo-output" / "comfy-base"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vae", type=Path, help="a real VAE .safetensors (default: a random-weight SD VAE)")
    args = ap.parse_args()

    assets = demo_assets.prepare(BASE, args.vae)
    print(f"VAE: {assets.description}")
    print(f"latent: random {list(assets.latent_shape)} -> {BASE / 'input' / assets.latent_name}")

    ours = prompts.example_prompt(assets.vae_name, assets.latent_name)
    settings = {k: ours["3"]["inputs"][k] for k in prompts.SETTINGS}
    core = prompts.example_prompt(assets.vae_name, assets.latent_name)
    core["3"] = prompts.vae_decode_tiled(settings)
    if assets.causal:  # compare with a temporal tile covering every frame: ours never cuts time
        core["3"]["inputs"]["temporal_size"] = max(settings["temporal_size"], 4 * assets.latent_shape[2])
        print(f"causal video VAE: VAE Decode (Tiled) runs with temporal_size={core['3']['inputs']['temporal_size']} "
              f"so that it does not cut time either")
    core["4"]["inputs"]["filename_prefix"] = "parallel_vae/vae_decode_tiled"

    t0 = time.monotonic()
    with ComfyServer(BASE) as server:
        print(f"ComfyUI started in {time.monotonic() - t0:.1f} s at {server.url} (log: {server.log_path})")
        results = {}
        for label, prompt in (("Parallel Tiled VAE Decode", ours), ("VAE Decode (Tiled)", core)):
            run = server.run(prompt)
            if not run.ok:
                print(f"{label} failed: {run.error or run.response}\n{server.log_tail()}", file=sys.stderr)
                return 1
            images = saved_images(server, run, "4")
            files = [BASE / "output" / f["subfolder"] / f["filename"] for f in run.outputs("4")["images"]]
            results[label] = images
            print(f"{label}: {images.shape[0]} image(s) of {images.shape[2]}x{images.shape[1]} in "
                  f"{run.node_seconds('3'):.2f} s -> {files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else ""))
    a, b = results.values()
    diff = abs(a - b)
    print(f"max abs difference vs VAE Decode (Tiled): {int(diff.max())}/255 on 8-bit PNGs; "
          f"identical pixels: {100 * (diff == 0).mean():.2f}%")
    print("(float32 equality within 1e-4 is what `make test` checks; see README 'Correctness')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
