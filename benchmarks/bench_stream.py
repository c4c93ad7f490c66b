"""Streaming decode + save against ComfyUI's VAEDecode + Save Image, through a real server, in one run.

Each run gets a fresh headless ComfyUI server (main.py --cpu) with the random-weight Wan 2.1 VAE
(ComfyUI's real layout) and the same random latent, and posts one API prompt:

  ours       Load Latent -> Parallel Tiled VAE Decode (Stream) -> Save Video (Stream), PNG sequence,
             decoding in ComfyUI's process (devices=cpu)
  ours:cpu2  the same on two worker processes (devices=cpu:2, tile 3/4 of the frame, so 4 tiles);
             its RSS is ComfyUI's process plus both workers' peaks
  core       Load Latent -> VAEDecode -> SaveImage (ComfyUI's own nodes; the whole video is one IMAGE)

for a short and a long video at the same resolution (17 and 161 frames by default). ``--vae ltxv``
runs the non-causal LTXV VAE instead (random weights, the small metadata-decided config; ComfyUI
0.9.2+): 33 and 153 frames by default, cut into temporal tiles as VAE Decode (Tiled) cuts them. Printed per
run: the decode+save node time, peak RSS (VmHWM), time from the decode
starting to the first preview frame on the websocket (ours), and the largest 8-bit difference
between our PNGs and SaveImage's. Then the ratios the stream issue asks for: peak RSS long/short
(ours must stay within 10%), and ours vs core.

The tile covers the whole frame, so for Wan our frames equal VAEDecode's (vae.decode) exactly; the
point here is memory against video length, not tiling. LTXV's frames differ from VAEDecode's where
its temporal tiles meet (they equal VAE Decode (Tiled)'s; the tests check that).

Peak RSS on glibc depends on heap fragmentation as much as on the memory a decode needs: freed
blocks of the VAE's large temporaries stay in the heap, more so the longer a process decodes, and
the same run varies by up to 25%. ``--mmap-threshold BYTES`` sets MALLOC_MMAP_THRESHOLD_ in the
servers, so every large block is returned to the system when freed: the peak then shows the
memory the decode holds (slower: each large block is a fresh mapping).

    .venv/bin/python benchmarks/bench_stream.py [--vae wan21|ltxv] [--size 256] [--frames 5,41] [--batch 8]
                                                [--mmap-threshold N]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402
from testkit import latents, random_vaes  # noqa: E402
from testkit.procs import workers_of  # noqa: E402
from group_memory import TotalMemory, status_mib  # noqa: E402
from testkit.server import ComfyServer, prepare_base  # noqa: E402

# --vae: (family, latent channels, spatial factor, frames of a latent frame after the first,
# default short,long latent frames)
VAES = {"wan21": ("wan21", 16, 8, 4, "5,41"), "ltxv": ("ltxv_meta", 128, 32, 8, "5,20")}


def peak_rss_mib(pid: int) -> float:
    return status_mib(pid, ("VmHWM",))["VmHWM"]


def prompt_for(method: str, vae_name: str, latent_name: str, size: int, batch: int) -> dict:
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
              "2": {"class_type": "LoadLatent", "inputs": {"latent": latent_name}}}
    if method.startswith("ours"):
        workers = method == "ours:cpu2"
        tile = (size * 3 // 4) // 32 * 32 if workers else size
        prompt["3"] = {"class_type": "ParallelVAEDecodeStream",
                       "inputs": {"samples": ["2", 0], "vae": ["1", 0], "tile_size": tile, "overlap": tile // 4,
                                  "temporal_size": 64, "temporal_overlap": 8,
                                  "devices": "cpu:2" if workers else "cpu", "frames_per_batch": batch,
                                  "mode": "tiled"}}  # the figures in docs/BENCHMARKS.md are tiled mode
        prompt["4"] = {"class_type": "ParallelVAESaveVideo",
                       "inputs": {"frames": ["3", 0], "filename_prefix": "bench/ours", "fps": 16.0,
                                  "format": "png", "crf": 19}}
    else:
        prompt["3"] = {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}}
        prompt["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bench/core"}}
    return prompt


def first_preview_s(run) -> float | None:
    start = next(m["t"] for m in run.of_type("executing") if m["data"].get("node") == "3")
    shown = [m["t"] for m in run.of_type("binary") if m["event"] in (1, 4)]
    return shown[0] - start if shown else None


def one(method: str, vae: str, latent_frames: int, size: int, batch: int, tmp: Path, env: dict) -> dict:
    family, channels, spatial, _, _ = VAES[vae]
    base = prepare_base(tmp / f"{method}-{latent_frames}")
    vae_name = random_vaes.vae_filename(family)
    link = base / "models" / "vae" / vae_name
    link.unlink(missing_ok=True)  # left by an earlier run that failed
    link.symlink_to(random_vaes.ensure_vae_file(family, random_vaes.cache_dir()))
    name = f"bench_{latent_frames}.latent"
    shape = (1, channels, latent_frames, size // spatial, size // spatial)
    latents.save_latent(latents.random_latent(shape, 2024), base / "input" / name)
    with ComfyServer(base, env=env) as server:
        sampler = TotalMemory(server.proc.pid, lambda: workers_of(server.proc.pid))
        run = server.run(prompt_for(method, vae_name, name, size, batch), timeout=3600)
        total = sampler.stop()
        if not run.ok:
            raise SystemExit(f"{method} failed: {run.error}\n{server.log_tail()}")
        start = next(m["t"] for m in run.of_type("executing") if m["data"].get("node") == "3")
        end = next(m["t"] for m in run.of_type("executed") if m["data"]["node"] == "4")
        files = [base / "output" / f["subfolder"] / f["filename"] for f in run.outputs("4")["images"]]
        parent = peak_rss_mib(server.proc.pid)
        rss = parent + sum(peak_rss_mib(pid) for pid in workers_of(server.proc.pid))
        return {"method": method, "frames": len(files), "seconds": end - start, "rss": rss, "rss_comfyui": parent,
                "total_sampled": total,
                "first_preview": first_preview_s(run), "files": [str(f) for f in files]}


def max_diff(a: dict, b: dict) -> int:
    from testkit.latents import read_png

    return max(int(np.abs(read_png(x) - read_png(y)).max()) for x, y in zip(a["files"], b["files"]))


def only(args) -> int:
    """--only METHOD: that method alone at both lengths (what a figure is made of)."""
    short, long = (int(x) for x in (args.frames or VAES[args.vae][4]).split(","))
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
    for frames in (short, long):
        r = one(args.only, args.vae, frames, args.size, args.batch, args.tmp / args.only, env)
        print(f"{args.only} {r['frames']} frames: {r['seconds']:.1f} s, peak RSS {r['rss']:.0f} MiB "
              f"(ComfyUI's process {r['rss_comfyui']:.0f}; sampled total, shared once, "
              f"{r['total_sampled']:.0f})", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="frame width and height in pixels")
    ap.add_argument("--vae", choices=sorted(VAES), default="wan21")
    ap.add_argument("--frames", help="latent frame counts, short,long (Wan: 5,41 -> 17, 161 frames; LTXV: 5,20 "
                                     "-> 33, 153 frames)")
    ap.add_argument("--batch", type=int, default=8, help="frames_per_batch of the stream")
    ap.add_argument("--tmp", type=Path, default=REPO / ".cache" / "bench-stream")
    ap.add_argument("--mmap-threshold", type=int, help="MALLOC_MMAP_THRESHOLD_ for the servers (bytes)")
    ap.add_argument("--only", choices=("ours", "ours:cpu2", "core"), help="one method at both lengths")
    args = ap.parse_args()
    if args.only:
        return only(args)
    short, long = (int(x) for x in (args.frames or VAES[args.vae][4]).split(","))
    import shutil

    shutil.rmtree(args.tmp, ignore_errors=True)
    print(machine())
    malloc = f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "default glibc malloc"
    label = {"wan21": "Wan 2.1 VAE (random weights, small width)",
             "ltxv": "LTXV VAE (non-causal; random weights, small metadata config)"}[args.vae]
    print(f"{label}, {args.size}x{args.size}, CPU, fresh server per run, {malloc}\n")
    results = {}
    for frames in (short, long):
        for method in ("ours", "ours:cpu2", "core"):
            env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
            r = one(method, args.vae, frames, args.size, args.batch, args.tmp, env)
            results[(method, frames)] = r
            preview = f"{r['first_preview']:.2f} s" if r["first_preview"] is not None else "none"
            print(f"{method:9} {r['frames']:4d} frames: {r['seconds']:7.1f} s, peak RSS {r['rss']:7.0f} MiB "
                  f"(ComfyUI's process {r['rss_comfyui']:.0f}; sampled total, shared once, "
                  f"{r['total_sampled']:.0f}), first preview {preview}", flush=True)
        diff = max_diff(results[("ours", frames)], results[("core", frames)])
        tiled = max_diff(results[("ours:cpu2", frames)], results[("core", frames)])
        print(f"          max 8-bit difference vs core at {results[('ours', frames)]['frames']} frames: ours {diff}, "
              f"ours:cpu2 {tiled} (tiled: equals VAEDecodeTiled, not VAEDecode)")
    o_s, o_l, c_s, c_l = (results[k] for k in (("ours", short), ("ours", long), ("core", short), ("core", long)))
    w_s, w_l = results[("ours:cpu2", short)], results[("ours:cpu2", long)]
    print()
    print(f"peak RSS {o_l['frames']} vs {o_s['frames']} frames: ours {o_l['rss'] / o_s['rss']:.3f}x, "
          f"ours:cpu2 {w_l['rss'] / w_s['rss']:.3f}x (target <= 1.10; sampled total, shared once: "
          f"{w_l['total_sampled'] / w_s['total_sampled']:.3f}x), core {c_l['rss'] / c_s['rss']:.3f}x")
    print(f"peak RSS ours vs core at {o_l['frames']} frames: {o_l['rss'] / c_l['rss']:.3f}x")
    print(f"time ours vs core at {o_l['frames']} frames: {o_l['seconds'] / c_l['seconds']:.3f}x "
          f"(first preview after {o_l['first_preview']:.2f} s of {o_l['seconds']:.1f} s; "
          f"2 x total / frames = {2 * o_l['seconds'] / o_l['frames']:.2f} s)")
    summary = {f"{m}_{n}": {k: v for k, v in r.items() if k != "files"} for (m, n), r in results.items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
