"""How good is auto tile_size's memory estimate? Measured peak of one tile's decode against the
estimate (ComfyUI's ``memory_used_decode``, fitted per pixel: nodes/vae_info.decode_cost).

Each (family, tile) runs in its own fresh process: load the random-weight VAE through the real
VAELoader, decode a tiny latent (warm-up), then decode one tile-sized latent with ComfyUI's own
decode (one latent frame for video: the causal decode holds one step at a time) and read how far
the process's peak RSS rose above its RSS before the decode (the peak is reset first through
/proc/self/clear_refs, so the model load's own peak does not hide the decode's). Printed per row:
the estimate, the measured growth, and measured/estimate (below 1: the estimate is safe; auto uses
FRACTION of free memory on top).

    .venv/bin/python benchmarks/bench_auto_tile.py [--families sd,wan21_full] [--tiles 256,512]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024


def child(family: str, tile: int) -> None:
    import torch
    from testkit import comfy_env, random_vaes

    _, vae = random_vaes.load_in_process(family)
    pack = comfy_env.load_pack()
    spec = pack.nodes.vae_info.describe(vae)
    cost = pack.nodes.vae_info.decode_cost(vae, spec)
    side = tile // spec.scales[-1].factor
    frames = (1,) if spec.latent_dim == 3 else ()
    z = torch.randn((1, spec.latent_channels) + frames + (side, side))
    small = torch.randn((1, spec.latent_channels) + frames + (4, 4))
    with torch.inference_mode():
        vae.decode(small)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
        before = status_bytes("VmRSS")
        vae.decode(z)
        after = status_bytes("VmHWM")
    print(json.dumps({"estimate": cost.bytes(tile), "measured": after - before, "per_px": cost.per_px,
                      "fixed": cost.fixed}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="sd,wan21_full")
    ap.add_argument("--tiles", default="256,384,512")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    print(f"machine: {machine()}\n")
    print("| VAE | tile (px) | estimate (MiB) | measured peak growth (MiB) | measured / estimate |")
    print("|---|---:|---:|---:|---:|")
    for family in args.families.split(","):
        for tile in (int(t) for t in args.tiles.split(",")):
            r = subprocess.run([sys.executable, __file__, "--child", family, str(tile)], capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise SystemExit(f"{family} {tile} failed:\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {family} | {tile} | {row['estimate'] / 2**20:.0f} | {row['measured'] / 2**20:.0f} | "
                  f"{row['measured'] / row['estimate']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
