"""Exact SD decode bands in contiguous against channels-last memory, interleaved in one process.

The VM's neighbours move a decode's time by 10-20% between runs, more than the layout changes it,
so this script times VAEDecode and in-process exact decodes with ``SdExact.fmt`` switched between
them, alternating, on the same latent and random-weight SD VAE (ComfyUI's real layout, the real
VAELoader), after one small warm-up decode each. Printed: each run's seconds, then each layout's
best against VAEDecode's best, and the max abs difference against VAEDecode.

    .venv/bin/python benchmarks/bench_layout.py [--size 1024] [--rounds 2] [--threads 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from testkit import comfy_env, random_vaes

    nodes, vae = random_vaes.load_in_process("sd")
    pack = comfy_env.load_pack()
    executor = pack.parallel_vae.exact.sd.SdExact
    ours = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "bench"})
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

    def decode(method, z):
        if method == "VAEDecode":
            return nodes.VAEDecode().decode(vae, {"samples": z})[0]
        executor.fmt = layouts[method]
        return ours.execute({"samples": z}, vae, 512, 64, 64, 8, "cpu", mode="exact").result[0]

    print(machine(), f"torch threads {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(1234)
    methods = ["VAEDecode", *layouts]
    times = {m: [] for m in methods}
    out = {}
    with torch.inference_mode():
        for method in methods:
            decode(method, torch.randn(1, 4, 8, 8, generator=gen))
        z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=gen)
        for r in range(args.rounds):
            for method in (methods if r % 2 == 0 else methods[::-1]):
                t = time.perf_counter()
                out[method] = decode(method, z)
                times[method].append(time.perf_counter() - t)
                print(f"  {method}: {times[method][-1]:.1f} s", flush=True)
    base = min(times["VAEDecode"])
    for method in layouts:
        diff = (out[method] - out["VAEDecode"]).abs().max().item()
        print(f"exact in-process, {method} bands: best {min(times[method]):.1f} s, "
              f"{min(times[method]) / base:.2f}x VAEDecode's best ({base:.1f} s), max abs diff {diff:.1e}")


if __name__ == "__main__":
    main()
