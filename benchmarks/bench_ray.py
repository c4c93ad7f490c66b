"""Ray lanes against local worker processes on the same number of CPU lanes, on a simulated
cluster on this machine (a head that takes no work and two one-CPU nodes): seconds per job,
overhead per tile, ComfyUI's peak RSS, and the bytes a cold and a warm prompt put into Ray's
object store. Both run the node in ComfyUI's process on the same latent; each method in its own
fresh process, one timed decode after a warm-up decode of the same size.

    .venv/bin/python benchmarks/bench_ray.py [--shape 1,4,48,48] [--tile 128]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402

METHODS = {"local cpu:2": "cpu:2", "ray:cpu:1 (2 nodes)": "ray:cpu:1"}


def child(devices: str, shape: tuple, tile: int) -> None:
    import contextlib

    import torch
    from testkit import comfy_env, latents, observe, random_vaes, ray_cluster

    _, vae = random_vaes.load_in_process("sd")
    pack = comfy_env.load_pack()
    node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "bench"})
    stack = contextlib.ExitStack()
    if devices.startswith("ray"):
        stack.enter_context(ray_cluster.attached(pack.nodes.backends.shutdown))
    run = lambda z: node.execute({"samples": z}, vae, tile, tile // 4, 64, 8, devices, mode="tiled").result[0]  # noqa: E731
    with stack, torch.inference_mode(), observe.decodes(pack) as seen:
        t = time.perf_counter()
        run(latents.random_latent(shape, seed=1))
        cold = time.perf_counter() - t
        pool = (pack.nodes.backends.ray_pool if devices.startswith("ray") else pack.nodes.backends.local_pool)()
        cold_bytes = getattr(pool.transport, "put_bytes", 0)
        cold_pixels = getattr(pool.transport, "result_bytes", 0)
        z = latents.random_latent(shape, seed=2)
        t = time.perf_counter()
        run(z)
        seconds = time.perf_counter() - t
        warm_bytes = getattr(pool.transport, "put_bytes", 0) - cold_bytes
        pixel_bytes = getattr(pool.transport, "result_bytes", 0) - cold_pixels  # local workers: shared memory
        tiles = len(seen.last.units)
        per_lane = seen.last.per_lane()
        if not devices.startswith("ray"):  # Ray's lanes end with the cluster (ray_cluster.attached)
            pack.nodes.backends.shutdown()
    print(json.dumps({"seconds": seconds, "cold": cold, "tiles": tiles, "per_lane": per_lane,
                      "cold_bytes": cold_bytes, "warm_bytes": warm_bytes, "pixel_bytes": pixel_bytes,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,4,48,48")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.child:
        return child(args.child, shape, args.tile)
    print(f"machine: {machine()}\nSD VAE (full size), latent {list(shape)}, tile {args.tile}, tiled mode\n")
    rows = {}
    for label, devices in METHODS.items():
        r = subprocess.run([sys.executable, __file__, "--child", devices, "--shape", args.shape,
                            "--tile", str(args.tile)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{label} failed:\n{r.stderr[-4000:]}")
        rows[label] = json.loads(r.stdout.strip().splitlines()[-1])
    base = rows["local cpu:2"]
    print("| lanes | tiles | warm s | vs local | overhead per tile (ms) | cold s | ComfyUI peak RSS (MiB) "
          "| bytes put, cold prompt | bytes put, warm prompt | pixels back, warm prompt |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        over = 1000 * (r["seconds"] - base["seconds"]) / max(1, r["tiles"])
        print(f"| {label} | {r['tiles']} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f}x | "
              f"{over:+.1f} | {r['cold']:.1f} | {r['peak_rss_mb']:.0f} | {r['cold_bytes'] / 2**20:.1f} MiB | "
              f"{r['warm_bytes'] / 2**10:.1f} KiB | {r['pixel_bytes'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
