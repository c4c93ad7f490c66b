"""VAEDecode vs VAEDecodeTiled vs ParallelVAEDecode on the same latent, in one run.

Each method runs in its own fresh process (so its peak RSS is its own) on the same random latent
and the same random-weight VAE in ComfyUI's real layout. The parent prints, per method: seconds
(best of N runs after one warm-up run, since ComfyUI is a long-lived process), the process's
peak RSS (same model and setup in every process, so differences come from the decode), how much
RSS grew during the first (cold) decode, max abs difference against VAEDecodeTiled, PSNR against
the untiled VAEDecode, and ratios against VAEDecodeTiled.

    .venv/bin/python benchmarks/bench_decode.py [--case sd|wan|all] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

CASES = {
    # name: VAE family, latent shape, (tile_size, overlap, temporal_size, temporal_overlap), note
    "sd": ("sd", (1, 4, 48, 48), (256, 32, 64, 8), "SD VAE (full size), 384x384 image"),
    "wan": ("wan21_full", (1, 16, 5, 24, 24), (128, 32, 64, 8), "Wan 2.1 VAE (real width), 17 frames 192x192"),
}
# (label, node, overrides of the case's settings)
METHODS = {
    "sd": [("VAEDecode", "VAEDecode", {}), ("VAEDecodeTiled", "VAEDecodeTiled", {}),
           ("ParallelVAEDecode", "ParallelVAEDecode", {})],
    "wan": [("VAEDecode", "VAEDecode", {}), ("VAEDecodeTiled", "VAEDecodeTiled", {}),
            ("VAEDecodeTiled, temporal_size=16", "VAEDecodeTiled", {"temporal_size": 16}),
            ("ParallelVAEDecode", "ParallelVAEDecode", {})],
}
REFERENCE, UNTILED = "VAEDecodeTiled", "VAEDecode"


class RssSampler(threading.Thread):
    """Peak resident memory of this process while a decode runs, sampled every 5 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def child(case: str, label: str, out: Path, repeat: int) -> None:
    import torch
    from testkit import comfy_env, latents, random_vaes

    family, shape, settings, _ = CASES[case]
    nodes, vae = random_vaes.load_in_process(family)
    z = latents.random_latent(shape, seed=1234)
    _, node, overrides = next(m for m in METHODS[case] if m[0] == label)
    tile, overlap, tsize, toverlap = {**dict(zip(("tile_size", "overlap", "temporal_size", "temporal_overlap"),
                                                 settings)), **overrides}.values()
    if node == "ParallelVAEDecode":
        pack = comfy_env.load_pack()
        decode_node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "bench"})
        run = lambda: decode_node.execute({"samples": z}, vae, tile, overlap, tsize, toverlap, "auto",  # noqa: E731
                                          mode="tiled").result[0]
    elif node == "VAEDecodeTiled":
        run = lambda: nodes.VAEDecodeTiled().decode(vae, {"samples": z}, tile, overlap, tsize, toverlap)[0]  # noqa: E731
    else:
        run = lambda: nodes.VAEDecode().decode(vae, {"samples": z})[0]  # noqa: E731
    import gc
    import resource

    times = []
    with torch.inference_mode():
        for i in range(repeat + 1):  # run 0 is the warm-up: its time is not counted
            gc.collect()
            if i == 0:
                sampler = RssSampler()
                before = sampler.peak
                sampler.start()
            t = time.perf_counter()
            images = run()
            if i == 0:
                sampler.stop.set()
                sampler.join()
                growth = sampler.peak - before
            else:
                times.append(time.perf_counter() - t)
            if i < repeat:
                del images
    torch.save(images.float().contiguous(), out)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    print(json.dumps({"seconds": min(times), "peak_rss_mb": peak_kib / 1024, "growth_mb": growth / 2**20,
                      "shape": list(images.shape)}))


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} "
            f"GiB RAM, {gpu}; torch {torch.__version__}, Python {platform.python_version()}")


def parent(cases: list[str], repeat: int) -> None:
    import torch

    print(f"machine: {machine()}")
    for case in cases:
        family, shape, settings, note = CASES[case]
        print(f"\n### {note}\nlatent {list(shape)}, tile_size/overlap/temporal_size/temporal_overlap = "
              f"{'/'.join(map(str, settings))}; seconds: best of {repeat} after a warm-up run\n")
        rows, outputs = [], {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, _, _ in METHODS[case]:
                out = Path(tmp) / f"{len(rows)}.pt"
                r = subprocess.run([sys.executable, __file__, "--child", case, label, str(out), "--repeat", str(repeat)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"{label} failed:\n{r.stderr[-4000:]}")
                stats = json.loads(r.stdout.strip().splitlines()[-1])
                outputs[label] = torch.load(out)
                rows.append((label, stats))
        ref, untiled = outputs[REFERENCE], outputs[UNTILED]
        base = dict(rows)[REFERENCE]
        print("| method | seconds | time vs VAEDecodeTiled | peak RSS (MiB) | peak RSS vs VAEDecodeTiled "
              "| RSS growth, first decode (MiB) | max abs diff vs VAEDecodeTiled | PSNR vs VAEDecode (dB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, stats in rows:
            diff = float((outputs[label] - ref).abs().max())
            p = psnr(outputs[label], untiled)
            print(f"| {label} | {stats['seconds']:.2f} | {stats['seconds'] / base['seconds']:.3f}x | "
                  f"{stats['peak_rss_mb']:.0f} | {stats['peak_rss_mb'] / base['peak_rss_mb']:.3f}x | "
                  f"{stats['growth_mb']:.0f} | {diff:.2e} | {'inf' if p == math.inf else f'{p:.1f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", nargs=3, metavar=("CASE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]), args.repeat)
    else:
        parent(list(CASES) if args.case == "all" else [args.case], args.repeat)


if __name__ == "__main__":
    main()
