"""Everything that needs a GPU, in one command, as one table (`make gpu-check`).

On each ComfyUI runtime (.comfyui, and .comfyui-0.3.75 when it exists), in a fresh process with
ComfyUI on the GPU and TF32 off, with random-weight SD and Wan 2.1 VAEs loaded by the real VAELoader:
  - in-process CUDA decode (ours, tiled) vs VAE Decode (Tiled) and VAE Decode: max abs, seconds,
    peak VRAM;
  - exact mode on the GPU vs VAE Decode;
  - exact encode on the GPU vs VAE Encode (the decoded frames encoded again): seconds, peak VRAM;
  - a CUDA worker next to a CPU worker (devices "cuda:0,cpu") vs VAE Decode (Tiled);
  - the out-of-memory path: exact mode under a tight per-process cap (its bands split and retry);
  - POST /free's path (workers.release): the GPU memory the worker held comes back.
Each check is one row; a check that fails prints its error in its row and the script goes on.
Without a visible GPU it prints one line saying so and exits 0 (CI has none).

    .venv/bin/python benchmarks/gpu_check.py [--runtime .comfyui]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

RUNTIMES = (".comfyui", ".comfyui-0.3.75")
CASES = {"sd": (1, 4, 96, 96), "wan21": (1, 16, 5, 32, 32)}  # 768x768; Wan 17 frames of 256x256


def timed(fn):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20


def child() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from testkit import comfy_env, random_vaes

    rows = []

    def row(check, **values):
        rows.append({"check": check, **values})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    for family, shape in CASES.items():
        try:
            nodes, vae = random_vaes.load_in_process(family, cpu=False)
            pack = comfy_env.load_pack()
            ours_node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "gpu"})
            z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                untiled, s_u, v_u = timed(lambda: nodes.VAEDecode().decode(vae, {"samples": z})[0])
                tiled, s_t, v_t = timed(lambda: nodes.VAEDecodeTiled().decode(vae, {"samples": z}, 512, 64, 64, 8)[0])
                row(f"{family}: VAE Decode", seconds=s_u, vram_mib=v_u)
                row(f"{family}: VAE Decode (Tiled) 512/64", seconds=s_t, vram_mib=v_t)

                def ours(devices, mode, tile=512):
                    return ours_node.execute({"samples": z}, vae, tile, 64, 64, 8, devices, mode=mode).result[0]

                out, s, v = timed(lambda: ours("cuda:0", "tiled"))
                row(f"{family}: ours tiled, cuda:0", seconds=s, vram_mib=v,
                    max_abs_vs_tiled=float((out - tiled).abs().max()))
                out, s, v = timed(lambda: ours("cuda:0", "exact"))
                row(f"{family}: ours exact, cuda:0", seconds=s, vram_mib=v,
                    max_abs_vs_untiled=float((out - untiled).abs().max()))
                out, s, _ = timed(lambda: ours("cuda:0,cpu", "tiled", 256))
                ref = nodes.VAEDecodeTiled().decode(vae, {"samples": z}, 256, 64, 64, 8)[0]
                row(f"{family}: ours tiled, workers cuda:0,cpu", seconds=s,
                    max_abs_vs_tiled=float((out - ref).abs().max()))
                # encode: VAE Encode against ours in exact mode, on the decoded frames
                enc_node = comfy_env.node_clone(pack.nodes.ParallelVAEEncode, {"UNIQUE_ID": "gpu-encode"})
                px = untiled
                enc_ref, s_e, v_e = timed(lambda: nodes.VAEEncode().encode(vae, px)[0]["samples"])
                row(f"{family}: VAE Encode", seconds=s_e, vram_mib=v_e)
                out, s, v = timed(lambda: enc_node.execute(px, vae, 512, 64, 64, 8, "cuda:0",
                                                           mode="exact").result[0]["samples"])
                row(f"{family}: ours exact encode, cuda:0", seconds=s, vram_mib=v,
                    max_abs_vs_untiled=float((out - enc_ref).abs().max()))
                held = [r.get("held_mib") for r in pack.nodes.backends.report()["workers"]]
                free_before = torch.cuda.mem_get_info()[0]
                pack.nodes.backends.release("gpu check")
                time.sleep(1.0)
                row(f"{family}: /free path (backends.release)", worker_held_mib=held,
                    gpu_free_gain_mib=(torch.cuda.mem_get_info()[0] - free_before) / 2**20)
                if family == "sd":
                    torch.cuda.empty_cache()
                    torch.cuda.set_per_process_memory_fraction(
                        min(1.0, (torch.cuda.memory_allocated() + (v_u * 2**20) * 0.5) / torch.cuda.mem_get_info()[1]))
                    try:
                        out, s, v = timed(lambda: ours("cuda:0", "exact", 4096))
                        row("sd: exact under a cap of half VAE Decode's peak", seconds=s, vram_mib=v,
                            max_abs_vs_untiled=float((out - untiled).abs().max()))
                    finally:
                        torch.cuda.set_per_process_memory_fraction(1.0)
        except Exception as e:  # one row per failure; the other checks still run
            row(f"{family}: error", error=f"{type(e).__name__}: {e}"[:300])
    print(json.dumps(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", action="append", help="ComfyUI trees to check (default: both runtimes)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child()
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible here; nothing to check (exit 0)")
        return 0
    from bench_decode import machine

    print(f"machine: {machine()}, {torch.cuda.get_device_name(0)}")
    print("| runtime | check | seconds | peak VRAM (MiB) | max abs | notes |")
    print("|---|---|---:|---:|---:|---|")
    for runtime in args.runtime or [r for r in RUNTIMES if (REPO / r / "main.py").is_file()]:
        env = {**os.environ, "COMFYUI_DIR": str(REPO / runtime)}
        r = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                           timeout=600)
        lines = r.stdout.strip().splitlines()
        if r.returncode != 0 or not lines:
            print(f"| {runtime} | crashed | | | | {r.stderr.strip()[-300:]!r} |")
            continue
        for row in json.loads(lines[-1]):
            abs_ = row.get("max_abs_vs_tiled", row.get("max_abs_vs_untiled"))
            notes = {k: v for k, v in row.items() if k not in ("check", "seconds", "vram_mib", "max_abs_vs_tiled",
                                                               "max_abs_vs_untiled")}
            print(f"| {runtime} | {row['check']} | {row.get('seconds', float('nan')):.2f} | "
                  f"{row.get('vram_mib', float('nan')):.0f} | {'' if abs_ is None else f'{abs_:.1e}'} | "
                  f"{json.dumps(notes) if notes else ''} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
