"""Worker pool against ComfyUI's VAEDecodeTiled on the same latent, in one run.

Each method runs in its own fresh process on the same random latent and random-weight VAE in
ComfyUI's real layout, and the methods take turns for ``--rounds`` rounds (so drift on a shared
machine hits them all alike). Printed per method: seconds (best over the rounds, each a timed run
after a warm-up run that also starts the workers), peak RSS of ComfyUI's process, the workers'
peak RSS and proportional share (PSS: CPU workers share one copy of the weights), max abs
difference against VAEDecodeTiled; then the ratios the worker issue asks for:

  scaling      cpu:2 workers (1 torch thread each) vs cpu:1 (1 thread)          target >= 1.85x
  vs ComfyUI   cpu:2 workers vs VAEDecodeTiled with torch on every core         target >= 1.0x
  one lane     cpu:1 worker vs VAEDecodeTiled on the same thread count          overhead <= 3%
               cpu:1 worker vs our in-process lane, round by round (paired)     within 3%
               (and each variant in VARIANTS against the in-process lane the same way)
  warm prompt  node start -> first tile blended, and weights bytes sent (0)

Our node runs with mode=tiled: the comparison is with VAEDecodeTiled's tiles. ``--methods`` runs
a subset (keys below), e.g. ``--methods tiled,inproc,cpu1x2`` for the one-lane figures alone.

    .venv/bin/python benchmarks/bench_workers.py [--case sd|wan|all] [--rounds N] [--methods K,K]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from bench_decode import machine  # noqa: E402

CORES = len(os.sched_getaffinity(0))
CASES = {
    # name: VAE family, latent shape, (tile_size, overlap, temporal_size, temporal_overlap), note
    "sd": ("sd", (1, 4, 32, 32), (128, 32, 64, 8), "SD VAE (full size), 256x256 image, 23 tiles"),
    "wan": ("wan21_full", (1, 16, 3, 24, 24), (128, 32, 64, 8), "Wan 2.1 VAE (real width), 9 frames 192x192"),
}
# label: (node, devices, torch threads in ComfyUI's process, torch threads per worker)
METHODS = {
    f"VAEDecodeTiled, {CORES} threads": ("VAEDecodeTiled", None, CORES, None),
    f"ours in-process (cpu), {CORES} threads": ("ParallelVAEDecode", "cpu", CORES, None),
    f"ours cpu:1, 1 worker x {CORES} threads": ("ParallelVAEDecode", "cpu:1", 1, CORES),
    "ours cpu:1, 1 worker x 1 thread": ("ParallelVAEDecode", "cpu:1", 1, 1),
    f"ours cpu:{CORES}, {CORES} workers x 1 thread": ("ParallelVAEDecode", f"cpu:{CORES}", 1, 1),
}
KEYS = dict(zip(("tiled", "inproc", "cpu1x2", "cpu1x1", f"cpu{CORES}"), METHODS))  # --methods
# Variants of the one worker lane, run only when --methods names them (what the overhead was):
# the worker with glibc's own heap trimming (heap.Heap.keep off), and ComfyUI's process on every
# core as ComfyUI leaves torch (its threads spin-wait after each blend while the worker decodes).
VARIANTS = {
    "cpu1x2trim": (f"ours cpu:1, 1 worker x {CORES} threads, glibc heap trimming",
                   ("ParallelVAEDecode", "cpu:1", 1, CORES), {"PARALLEL_VAE_KEEP_HEAP": "0"}),
    f"cpu1x2p{CORES}": (f"ours cpu:1, 1 worker x {CORES} threads, ComfyUI's process on {CORES} threads",
                        ("ParallelVAEDecode", "cpu:1", CORES, CORES), {}),
}
ENV = {}
for key, (label, method, env) in VARIANTS.items():
    METHODS[label], KEYS[key], ENV[label] = method, label, env
DEFAULT_KEYS = [k for k in KEYS if k not in VARIANTS]
REFERENCE = f"VAEDecodeTiled, {CORES} threads"
IN_PROCESS, ONE_WORKER = KEYS["inproc"], KEYS["cpu1x2"]


def worker_memory_kib(pool) -> tuple[int, int]:
    """(sum of peak RSS, sum of current PSS) over the pool's workers."""
    hwm = pss = 0
    for pid in (pool.pids() if pool else {}).values():
        with open(f"/proc/{pid}/status") as f:
            hwm += int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss += int(next(line for line in f if line.startswith("Pss:")).split()[1])
    return hwm, pss


def cpu_seconds(pids) -> float:
    """User + system CPU time of processes so far (all their threads)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except FileNotFoundError:  # a worker that died (and was replaced) during the run
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def child(case: str, label: str, out: Path, repeat: int) -> None:
    node, devices, threads, worker_threads = METHODS[label]
    if worker_threads:
        os.environ["PARALLEL_VAE_CPU_THREADS"] = str(worker_threads)
    os.environ.update(ENV.get(label, {}))  # workers inherit it
    import gc
    import resource

    import torch
    import contextlib

    from testkit import comfy_env, latents, observe, random_vaes

    torch.set_num_threads(threads)
    family, shape, settings, _ = CASES[case]
    nodes, vae = random_vaes.load_in_process(family)
    z = latents.random_latent(shape, seed=1234)
    pack = None
    if node == "ParallelVAEDecode":
        pack = comfy_env.load_pack()
        decode_node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "bench"})
        run = lambda: decode_node.execute({"samples": z}, vae, *settings, devices,  # noqa: E731
                                          mode="tiled").result[0]
    else:
        run = lambda: nodes.VAEDecodeTiled().decode(vae, {"samples": z}, *settings)[0]  # noqa: E731
    times, first_unit, sent, cpu = [], [], [], []
    watch = observe.decodes(pack) if pack else contextlib.nullcontext()
    with torch.inference_mode(), watch as seen:
        for i in range(repeat + 1):  # run 0 is the warm-up (and starts the workers): not counted
            gc.collect()
            pool = pack.nodes.backends.local_pool() if pack else None
            before = pool.stats.weights_bytes if pool else 0
            pids = list(pool.pids().values()) if pool else []
            cpu0 = (time.process_time(), cpu_seconds(pids))
            t = time.perf_counter()
            start = time.monotonic()
            images = run()
            if i:
                times.append(time.perf_counter() - t)
                cpu.append((time.process_time() - cpu0[0], cpu_seconds(pids) - cpu0[1]))
                if pack:
                    first_unit.append(seen.first_unit_at - start)
                pool = pack.nodes.backends.local_pool() if pack else None
                sent.append((pool.stats.weights_bytes - before) if pool else 0)
            if i < repeat:
                del images
    pool = pack.nodes.backends.local_pool() if pack else None
    workers_hwm, workers_pss = worker_memory_kib(pool)
    torch.save(images.float().contiguous(), out)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": min(times), "peak_rss_mb": peak_kib / 1024,
                      "workers_rss_mb": workers_hwm / 1024, "workers_pss_mb": workers_pss / 1024,
                      "first_unit_s": min(first_unit) if first_unit else None,
                      "weights_sent": max(sent) if sent else 0,
                      "cpu_s": cpu[times.index(min(times))]}))  # (ComfyUI's process, workers) in the best run
    if pack:
        pack.nodes.backends.shutdown()


def parent(cases: list[str], rounds: int, methods: list[str]) -> None:
    import torch

    print(f"machine: {machine()}")
    for case in cases:
        family, shape, settings, note = CASES[case]
        print(f"\n### {note}\nlatent {list(shape)}, tile_size/overlap/temporal_size/temporal_overlap = "
              f"{'/'.join(map(str, settings))}; seconds: best of {rounds} rounds, each a run after a warm-up run\n")
        rows, outputs, per_round = {}, {}, []
        with tempfile.TemporaryDirectory() as tmp:
            for r_i in range(rounds):
                per_round.append({})
                for label in methods:
                    out = Path(tmp) / f"{list(METHODS).index(label)}.pt"
                    r = subprocess.run([sys.executable, __file__, "--child", case, label, str(out), "--repeat", "1"],
                                       capture_output=True, text=True)
                    if r.returncode != 0:
                        raise SystemExit(f"{label} failed:\n{r.stderr[-4000:]}")
                    got = json.loads(r.stdout.strip().splitlines()[-1])
                    print(f"  round {r_i + 1}: {label}: {got['seconds']:.2f} s (CPU s: ComfyUI's process "
                          f"{got['cpu_s'][0]:.2f}, workers {got['cpu_s'][1]:.2f})", file=sys.stderr, flush=True)
                    per_round[-1][label] = got["seconds"]
                    if label in rows:  # best time over the rounds; memory from the first
                        rows[label]["seconds"] = min(rows[label]["seconds"], got["seconds"])
                        if got["first_unit_s"] is not None:
                            rows[label]["first_unit_s"] = min(rows[label]["first_unit_s"], got["first_unit_s"])
                    else:
                        rows[label] = got
                        outputs[label] = torch.load(out)
        print("Every round's times (" + " / ".join(methods) + "): "
              + "; ".join(" / ".join(f"{r[label]:.2f}" for label in methods) for r in per_round) + "\n")
        if REFERENCE not in rows:
            one_lane(per_round)
            continue
        ref = rows[REFERENCE]
        print("| method | seconds | time vs VAEDecodeTiled | peak RSS, ComfyUI (MiB) | workers: peak RSS / PSS "
              "(MiB) | max abs diff vs VAEDecodeTiled | warm: node start -> first tile (s) | weights sent, warm |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, s in rows.items():
            diff = float((outputs[label] - outputs[REFERENCE]).abs().max())
            fu = "" if s["first_unit_s"] is None else f"{s['first_unit_s']:.3f}"
            sent = "" if METHODS[label][1] is None else f"{s['weights_sent']} B"
            print(f"| {label} | {s['seconds']:.2f} | {s['seconds'] / ref['seconds']:.3f}x | {s['peak_rss_mb']:.0f} | "
                  f"{s['workers_rss_mb']:.0f} / {s['workers_pss_mb']:.0f} | {diff:.2e} | {fu} | {sent} |")
        sec = {label: s["seconds"] for label, s in rows.items()}
        print()
        single, many = KEYS["cpu1x1"], KEYS[f"cpu{CORES}"]
        if single in sec and many in sec:
            print(f"- scaling, cpu:{CORES} vs cpu:1 (1 thread each): {sec[single] / sec[many]:.2f}x (target >= 1.85x)")
        if many in sec:
            print(f"- cpu:{CORES} workers vs VAEDecodeTiled on {CORES} threads: {sec[REFERENCE] / sec[many]:.2f}x "
                  f"faster (target >= 1.0x)")
        if ONE_WORKER in sec:
            print(f"- one worker lane vs VAEDecodeTiled, {CORES} threads each: "
                  f"{sec[ONE_WORKER] / sec[REFERENCE] - 1:+.1%} (target overhead <= 3%)")
        if IN_PROCESS in sec:
            print(f"- in-process lane vs VAEDecodeTiled: {sec[IN_PROCESS] / sec[REFERENCE] - 1:+.1%}")
        one_lane(per_round)


def one_lane(per_round: list[dict]) -> None:
    """The worker lane against the in-process lane, paired within each round (drift cancels)."""
    for label in [ONE_WORKER, *(label for label, _, _ in VARIANTS.values())]:
        pairs = [r[label] / r[IN_PROCESS] - 1 for r in per_round if label in r and IN_PROCESS in r]
        if pairs:
            print(f"- {label} vs in-process lane, round by round: {', '.join(f'{p:+.1%}' for p in pairs)}; "
                  f"median {statistics.median(pairs):+.1%}" + (" (target within 3%)" if label == ONE_WORKER else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(DEFAULT_KEYS), help=f"comma-separated, of {', '.join(KEYS)}")
    ap.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, metavar=("CASE", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]), args.repeat)
    else:
        unknown = [k for k in args.methods.split(",") if k not in KEYS]
        if unknown:
            ap.error(f"unknown --methods {unknown}; choose from {', '.join(KEYS)}")
        parent(list(CASES) if args.case == "all" else [args.case], args.rounds,
               [KEYS[k] for k in args.methods.split(",")])


if __name__ == "__main__":
    main()
