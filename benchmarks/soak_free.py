"""Soak: 100 prompts through a real headless ComfyUI on `cpu:2`, alternating two VAEs (SD and a
Flux-style 16-channel one), with "Free model and node cache" (POST /free, unload_models and
free_memory) every 25 prompts. Checks and prints:
  - after each /free no worker is left (they stop within seconds), and the next prompt brings two
    back;
  - the workers' memory after the first prompt of each block of 25 is back where the first block
    started (fresh workers hold the same);
  - ComfyUI's RSS growth from prompt 10 to prompt 100 (target under 5%);
  - at the end exactly two workers.

    .venv/bin/python benchmarks/soak_free.py [--prompts 100] [--free-every 25]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402
from testkit import latents, random_vaes  # noqa: E402
from testkit.procs import alive, workers_of  # noqa: E402
from testkit.prompts import example_prompt  # noqa: E402
from testkit.server import ComfyServer, prepare_base  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def prompt_for(family: str, latent: str, i: int) -> dict:
    p = example_prompt(random_vaes.vae_filename(family), latent)
    p["3"]["inputs"].update(tile_size=64, overlap=16, devices="cpu:2", mode="tiled")
    p["7"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["2", 0], "multiplier": 1.0 + i / 1000}}
    p["3"]["inputs"]["samples"] = ["7", 0]  # a new input each time: nothing comes from ComfyUI's cache
    p["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--free-every", type=int, default=25)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base(Path(tmp) / "base")
        vae_dir = random_vaes.cache_dir()
        for family, shape in (("sd", (1, 4, 12, 12)), ("flux", (1, 16, 12, 12))):
            path = random_vaes.ensure_vae_file(family, vae_dir)
            (base / "models" / "vae" / path.name).symlink_to(path)
            latents.save_latent(latents.random_latent(shape, 7), base / "input" / f"soak_{family}.latent")
        server = ComfyServer(base).start()
        try:
            pid = server.proc.pid
            rss, block_start, frees, failures = {}, [], [], []
            started = time.monotonic()
            for i in range(args.prompts):
                family = ("sd", "flux")[i % 2]
                run = server.run(prompt_for(family, f"soak_{family}.latent", i))
                if not run.ok:
                    failures.append((i, run.error))
                    continue
                rss[i + 1] = rss_mib(pid)
                if i % args.free_every == 0:
                    block_start.append(sum(rss_mib(w) for w in workers_of(pid)))
                if (i + 1) % args.free_every == 0 and i + 1 < args.prompts:
                    pids = workers_of(pid)
                    t = time.monotonic()
                    server.post("/free", {"unload_models": True, "free_memory": True})
                    while any(alive(w) for w in pids) and time.monotonic() - t < 30:
                        time.sleep(0.05)
                    frees.append((i + 1, len(pids), sum(alive(w) for w in pids), time.monotonic() - t))
            total = time.monotonic() - started
            final = workers_of(pid)
        finally:
            server.stop()
    print(f"{args.prompts} prompts in {total:.0f} s, {len(failures)} failed {failures[:3]}")
    for n, before, left, seconds in frees:
        print(f"/free after prompt {n}: {before} workers -> {left} left, gone in {seconds:.2f} s")
    print("workers' RSS after the first prompt of each block (MiB): "
          + ", ".join(f"{m:.0f}" for m in block_start)
          + f" (max/first {max(block_start) / block_start[0]:.3f})")
    first = 10 if args.prompts >= 10 else 1
    growth = rss[args.prompts] / rss[first] - 1
    print(f"ComfyUI RSS after prompt {first}: {rss[first]:.0f} MiB, after {args.prompts}: "
          f"{rss[args.prompts]:.0f} MiB ({growth:+.2%}; target under +5%)")
    print(f"workers at the end: {len(final)}")
    ok = not failures and all(left == 0 for _, _, left, _ in frees) and growth < 0.05 and len(final) == 2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
