"""How exact mode scales, measured in one run (issue 22, section 2).

Work ratio (``--work``): at one torch thread, one untiled decode (ComfyUI's own
``first_stage_model.decode``) and then the exact bands at N = 2, 4, 8, run one after another in this
process (so the machine's cores do not limit N). The ratio is the sum over bands of their compute
time over the untiled decode's time: 1.0 means every row is computed once at no extra cost.
Both cases run their bands in lock-step; the answers at each sync point (statistics combined,
edge rows, the attention's keys and values) are the parent's work and timed apart.
- SD (full size) 1024x1024.
- Wan 2.1 (real width) 9 frames 480x832: each band runs ComfyUI's Wan modules in a thread of its
  own (exact/threads.py); a band's compute is the time from its resumption to its next stop.

Lock-step cost (``--rounds``): on ``cpu:2`` through the pack in a real ComfyUI process, a narrow SD
latent (little compute) decoded exact on both workers several times: rounds per item, bytes moved
per round (from the bands' own requests), and the round trip as the workers measure it (the least
wait per round of a job's lanes, parallel_vae/rates.py). Then a projection for N lanes:

    speed-up(N) = N / (ratio(N) + N x rounds x round_s / T1)

T1 being one lane's untiled decode time: the compute shrinks with N (less the extra work of the
ratio), the rounds do not.

    .venv/bin/python benchmarks/bench_scaling.py [--work] [--rounds] [--sd-size 1024] [--wan 9x480x832]
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

BANDS = (2, 4, 8)


def _request_bytes(r) -> int:
    from parallel_vae.exact import lockstep

    if isinstance(r, lockstep.StatsRequest):
        return r.moments.mean.nbytes + r.moments.m2.nbytes
    if isinstance(r, lockstep.RowsRequest):
        return r.top.nbytes + r.bottom.nbytes
    return r.part.nbytes


def lockstep_bands(ex, z, spans) -> dict:
    """Drive bands in lock-step from this thread, timing each band's compute and the answers."""
    from parallel_vae.exact import lockstep, threads

    gens = [ex.band(z, a, e) for a, e in spans]
    busy = [0.0] * len(gens)
    answer_s, rounds, sent = 0.0, 0, 0
    requests: list = [None] * len(gens)

    def step(i, value):
        t = time.perf_counter()
        try:
            requests[i] = gens[i].send(value)
        except StopIteration:
            requests[i] = None
        busy[i] += time.perf_counter() - t

    for i in range(len(gens)):
        step(i, None)
    while any(r is not None for r in requests):
        if isinstance(requests[0], threads.Output):  # a decoder call's frames: nothing to answer
            replies = [None] * len(gens)
        else:
            rounds += 1
            sent += sum(_request_bytes(r) for r in requests)
            t = time.perf_counter()
            replies = lockstep.answers(requests)
            answer_s += time.perf_counter() - t
        requests = [None] * len(gens)
        for i in range(len(gens)):
            step(i, replies[i])
        replies = None
    return {"busy": busy, "answer_s": answer_s, "rounds": rounds, "bytes_per_round": sent / max(1, rounds)}


def work_ratio(sd_size: int, wan: tuple[int, int, int], only: str = "") -> list[str]:
    import torch
    from testkit import latents, random_vaes

    from parallel_vae import families
    from parallel_vae.exact.geometry import split_rows

    torch.set_num_threads(1)
    lines = ["| model | latent | untiled (s) | N | band compute sum (s) | work ratio | answers (s) | rounds | "
             "bytes per round |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    frames, h, w = wan
    cases = (("sd", "image", (1, 4, sd_size // 8, sd_size // 8), f"SD {sd_size}x{sd_size}"),
             ("wan21_full", "wan21", (1, 16, (frames - 1) // 4 + 1, h // 8, w // 8), f"Wan 2.1 {frames}x{h}x{w}"))
    for vae_family, family, shape, label in cases:
        if only and not label.lower().startswith(only):
            continue
        _, vae = random_vaes.load_in_process(vae_family)
        model = vae.first_stage_model
        ex = families.exact_executor(family, model, vae.vae_dtype, "cpu")
        z = latents.random_latent(shape, seed=7).to(vae.vae_dtype)
        with torch.inference_mode():
            t = time.perf_counter()
            model.decode(z)
            untiled = time.perf_counter() - t
            print(f"  {label}: untiled {untiled:.1f} s", file=sys.stderr, flush=True)
            for n in BANDS:
                spans = split_rows(shape[-2], n)
                got = lockstep_bands(ex, ex.prefix(z), spans)
                total = sum(got["busy"])
                extra = f"{got['answer_s']:.2f} | {got['rounds']} | {got['bytes_per_round'] / 2**10:.0f} KiB"
                lines.append(f"| {label} | {list(shape)} | {untiled:.1f} | {n} | {total:.1f} | "
                             f"{total / untiled:.3f} | {extra} |")
                print(f"  {label} N={n}: ratio {total / untiled:.3f}", file=sys.stderr, flush=True)
    return lines


def round_cost(repeats: int) -> tuple[list[str], dict]:
    import torch
    from testkit import comfy_env, latents, random_vaes

    _, vae = random_vaes.load_in_process("sd")
    pack = comfy_env.load_pack()
    node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "bench"})
    z = latents.random_latent((1, 4, 16, 2), seed=3)  # two bands of 8 rows, 16 px wide: little compute
    measured = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first loads the model on the workers
            node.execute({"samples": z}, vae, 512, 64, 64, 8, "cpu:2", mode="exact", sharding="every device")
            speeds = pack.nodes.backends.local_pool().speeds
            measured.append(speeds.last_round_s)
    rounds = pack.parallel_vae.families.exact_rounds("image", vae.first_stage_model)
    timed = sorted(measured[1:])
    round_s = timed[len(timed) // 2]
    pack.nodes.backends.shutdown()
    lines = [f"cpu:2, SD (full size), latent {list(z.shape)}, {repeats} timed decodes after one warm-up: "
             f"{rounds} rounds per item, round trip {1000 * round_s:.2f} ms (median over the decodes of the least "
             f"wait per round of each job's lanes; all: {', '.join(f'{1000 * m:.2f}' for m in timed)} ms)"]
    return lines, {"rounds": rounds, "round_s": round_s}


def projection(ratios: dict, rounds: int, round_s: float) -> list[str]:
    lines = ["| T1 (one lane's untiled decode) | " + " | ".join(f"N={n}" for n in BANDS) + " |",
             "|---|" + "---:|" * len(BANDS)]
    for t1 in (60.0, 5.0, 1.0, 0.25):
        cells = [f"{n / (ratios[n] + n * rounds * round_s / t1):.2f}x" for n in BANDS]
        lines.append(f"| {t1:g} s | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", action="store_true", help="only the work ratios")
    ap.add_argument("--rounds", action="store_true", help="only the lock-step round cost")
    ap.add_argument("--sd-size", type=int, default=1024)
    ap.add_argument("--wan", default="9x480x832", help="frames x height x width")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["sd", "wan"], default="", help="one model's work ratios")
    args = ap.parse_args()
    both = not (args.work or args.rounds)
    os.environ.setdefault("PARALLEL_VAE_CPU_THREADS", "1")
    print(f"machine: {machine()}\n")
    sd_ratios = {}
    if args.work or both:
        lines = work_ratio(args.sd_size, tuple(int(v) for v in args.wan.split("x")), args.only)
        print("\n".join(lines))
        sd_ratios = {int(cells[4]): float(cells[6]) for cells in (ln.split("|") for ln in lines[2:])
                     if cells[1].strip().startswith("SD")}
    if args.rounds or both:
        lines, cost = round_cost(args.repeats)
        print("\n" + "\n".join(lines))
        if sd_ratios:
            print("\nprojected speed-up of an SD exact decode on N lanes (this run's work ratios and round trip):\n")
            print("\n".join(projection(sd_ratios, cost["rounds"], cost["round_s"])))


if __name__ == "__main__":
    main()
