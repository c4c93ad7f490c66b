"""One lane's overhead, interleaved in one process: VAEDecodeTiled, ParallelVAEDecode in-process
("cpu") and on one worker process ("cpu:1"), all with torch on every core, taking turns for
``--rounds`` rounds on the same latent (best time per method). Taking turns inside one process
cancels the drift and per-process variance of a shared machine that separate processes suffer.

    .venv/bin/python benchmarks/bench_one_lane.py [--rounds N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402

CORES = len(os.sched_getaffinity(0))
SHAPE, SETTINGS = (1, 4, 32, 32), (128, 32, 64, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ["PARALLEL_VAE_CPU_THREADS"] = str(CORES)
    import torch
    from testkit import comfy_env, latents, random_vaes

    torch.set_num_threads(CORES)
    nodes, vae = random_vaes.load_in_process("sd")
    pack = comfy_env.load_pack()
    node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "bench"})
    z = latents.random_latent(SHAPE, seed=1234)
    methods = {
        "VAEDecodeTiled": lambda: nodes.VAEDecodeTiled().decode(vae, {"samples": z}, *SETTINGS)[0],
        "ours in-process (cpu)": lambda: node.execute({"samples": z}, vae, *SETTINGS, "cpu", mode="tiled").result[0],
        "ours on 1 worker (cpu:1)": lambda: node.execute({"samples": z}, vae, *SETTINGS, "cpu:1", mode="tiled").result[0],
    }
    print(f"machine: {machine()}\nSD VAE, latent {list(SHAPE)}, tile_size/overlap {SETTINGS[0]}/{SETTINGS[1]}, "
          f"torch threads {CORES} everywhere; best of {args.rounds} interleaved rounds after a warm-up\n")
    best, outs = {}, {}
    with torch.inference_mode():
        for label, run in methods.items():
            outs[label] = run()  # warm-up; starts the worker and loads the VAE there
        for r in range(args.rounds):
            for label, run in methods.items():
                t = time.perf_counter()
                run()
                dt = time.perf_counter() - t
                best[label] = min(best.get(label, dt), dt)
                print(f"  round {r + 1}: {label}: {dt:.2f} s", file=sys.stderr, flush=True)
    ref = best["VAEDecodeTiled"]
    print("| method | best seconds | vs VAEDecodeTiled | max abs diff vs VAEDecodeTiled |\n|---|---:|---:|---:|")
    for label, sec in best.items():
        diff = float((outs[label] - outs["VAEDecodeTiled"]).abs().max())
        print(f"| {label} | {sec:.2f} | {sec / ref - 1:+.1%} | {diff:.2e} |")
    pack.nodes.backends.shutdown()


if __name__ == "__main__":
    main()
