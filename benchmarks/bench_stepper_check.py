"""What the one-time check of a causal stepper costs (models/check.py), against one VAE Decode.

Before a stepper decodes real tiles, it decodes a tiny latent next to the model's own decode(), once
per model class and process (ComfyUI's, and each worker). This prints that cost per family on the
runtime given (default: the suite's default ComfyUI), next to ComfyUI's VAEDecode of a small video
latent with the same model, and their ratio.

    .venv/bin/python benchmarks/bench_stepper_check.py [--comfyui .comfyui-0.3.75]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

FAMILIES = {  # family to load: (decoder family, latent channels, latent shape VAEDecode gets)
    "wan21_full": ("wan21", 16, (1, 16, 5, 16, 16)),
    "wan22": ("wan22", 48, (1, 48, 2, 8, 8)),
    "taehv": ("taehv", 16, (1, 16, 5, 16, 16)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", help="ComfyUI tree (default: .comfyui)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    if args.comfyui:
        os.environ["PVAE_COMFYUI"] = str(Path(args.comfyui).resolve())
    import torch

    from bench_decode import machine
    from testkit import comfy_env, latents, random_vaes

    torch.set_grad_enabled(False)
    pack = comfy_env.load_pack()
    models = pack.parallel_vae.models
    print(f"{comfy_env.runtime_label()}; {machine()}")
    print(f"{'family':<12} {'check (s)':>10} {'VAEDecode (s)':>14} {'ratio':>7}  decode latent")
    for name in args.families.split(","):
        family, channels, shape = FAMILIES[name]
        nodes, vae = random_vaes.load_in_process(name)
        stepper = models._stepper(family, vae.first_stage_model, vae.vae_dtype, vae.device, "cpu", torch.float32)
        probe = models.check.probe_latents(channels, vae.vae_dtype, vae.device)
        start = time.perf_counter()
        diff = models.check.compare(stepper, probe)
        check_s = time.perf_counter() - start
        z = latents.random_latent(shape, 1)
        start = time.perf_counter()
        nodes.VAEDecode().decode(vae, {"samples": z})
        decode_s = time.perf_counter() - start
        print(f"{name:<12} {check_s:>10.2f} {decode_s:>14.2f} {check_s / decode_s:>7.3f}  {list(shape)}"
              f"  (max difference {diff:.3g})")


if __name__ == "__main__":
    main()
