"""Is tile_size 0 (auto) ever slower than the default 512? Decides whether auto may be the default.

For each case the node decodes the same latent with tile_size 512 and with 0, each in its own
fresh process (load the random-weight VAE through the real VAELoader, a small warm-up decode, one
timed decode), and prints the seconds, auto's choice and auto/512. Auto's tile or bands are what
this machine's free memory gives, so the figures hold for this machine only.

    .venv/bin/python benchmarks/bench_auto_speed.py [--cases sd768_tiled,sd768_exact_cpu2,...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402

# case: (family, latent shape, mode, devices)
CASES = {
    "sd768_tiled": ("sd", (1, 4, 96, 96), "tiled", "cpu"),
    "sd768_tiled_cpu2": ("sd", (1, 4, 96, 96), "tiled", "cpu:2"),
    "sd768_exact": ("sd", (1, 4, 96, 96), "exact", "cpu"),
    "sd768_exact_cpu2": ("sd", (1, 4, 96, 96), "exact", "cpu:2"),
    "wan_tiled": ("wan21_full", (1, 16, 5, 48, 48), "tiled", "cpu"),
    "wan_exact_cpu2": ("wan21_full", (1, 16, 5, 48, 48), "exact", "cpu:2"),
}
TILES = (512, 0)


def child(case: str, tile: int) -> None:
    import torch
    from testkit import comfy_env, latents, observe, random_vaes

    family, shape, mode, devices = CASES[case]
    _, vae = random_vaes.load_in_process(family)
    pack = comfy_env.load_pack()
    texts: list[str] = []
    pack.nodes.progress.send_text = lambda text, node_id: texts.append(text)
    node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "bench"})
    run = lambda z: node.execute({"samples": z}, vae, tile, 64, 64, 8, devices, mode=mode).result[0]  # noqa: E731
    warm = shape[:-2] + (8, 8)
    with torch.inference_mode(), observe.decodes(pack) as seen:
        run(latents.random_latent(warm, seed=1))
        z = latents.random_latent(shape, seed=7)
        t = time.perf_counter()
        run(z)
        seconds = time.perf_counter() - t
    units = len(seen.last.units)
    pack.nodes.backends.shutdown()
    print(json.dumps({"seconds": seconds, "units": units, "note": texts[-1] if texts else ""}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", nargs=2, metavar=("CASE", "TILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))
    print(f"machine: {machine()}\n")
    print("| case | latent | 512: s (units) | auto: s (units) | auto / 512 | auto chose |")
    print("|---|---|---:|---:|---:|---|")
    worst = 0.0
    for case in args.cases.split(","):
        got = {}
        for tile in TILES:
            r = subprocess.run([sys.executable, __file__, "--child", case, str(tile)], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{case} tile {tile} failed:\n{r.stderr[-4000:]}")
            got[tile] = json.loads(r.stdout.strip().splitlines()[-1])
        ratio = got[0]["seconds"] / got[512]["seconds"]
        worst = max(worst, ratio)
        note = got[0]["note"].split("; ", 1)[-1].rstrip(")")[:120]
        print(f"| {case} | {list(CASES[case][1])} | {got[512]['seconds']:.1f} ({got[512]['units']}) | "
              f"{got[0]['seconds']:.1f} ({got[0]['units']}) | {ratio:.2f}x | {note} |", flush=True)
    print(f"\nslowest auto / 512: {worst:.2f}x")


if __name__ == "__main__":
    main()
