"""How many lanes an exact job uses (parallel_vae/gate.py): the cost model, without ComfyUI."""
from __future__ import annotations

import pytest

from parallel_vae.gate import CPU_SPLIT_GAIN, Costs, choose
from parallel_vae.rates import Speeds

GPUS = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def gpu_costs(rate=50_000.0, round_s=0.002, start_s=0.05, local=None):
    return Costs(dict.fromkeys(GPUS, rate), local, round_s, start_s)


def test_a_big_job_uses_every_lane_and_a_tiny_one_stays_in_process():
    costs = gpu_costs()
    big = choose(GPUS, costs, rounds=64, work=128 * 128 * 50, size="1024x1024")
    assert big.lanes == tuple(GPUS) and big.why == ""
    tiny = choose(GPUS, costs, rounds=64, work=32 * 32, size="256x256")
    assert tiny.in_process and tiny.why == "in-process: 256x256 is too small to gain from 4 lanes"


def test_a_middling_job_uses_some_lanes_and_says_so():
    # one lane 1 s; 60 rounds of 5 ms: 2 lanes 0.5 + 0.3 s, 3 lanes 0.33 + 0.3 s; a slow fourth
    # lane (0.2x) would make it 1/3.2 + 0.3 = 0.61 s: not 10% better than 0.63 s
    costs = Costs({"cuda:0": 1000.0, "cuda:1": 1000.0, "cuda:2": 1000.0, "cuda:3": 200.0}, None, 0.005, 0.0)
    choice = choose(GPUS, costs, rounds=60, work=1000, size="512x512")
    assert choice.lanes == ("cuda:0", "cuda:1", "cuda:2")
    assert choice.why == "3 of 4 lanes: 512x512 is too small to gain from more"
    assert choice.seconds == pytest.approx(1 / 3 + 0.3)


def test_the_fastest_lanes_are_chosen_first():
    costs = Costs({"a": 1.0, "b": 4.0, "c": 2.0}, 4.0, 0.0, 0.0)
    assert choose(["a", "b", "c"], costs, 10, 100.0, "x").lanes == ("b", "c", "a")
    slow_gain = Costs({"a": 0.1, "b": 4.0, "c": 2.0}, 4.0, 0.0, 0.0)
    assert choose(["a", "b", "c"], slow_gain, 10, 100.0, "x").lanes == ("b", "c")


def test_pinned_or_unmeasured_lanes_all_decode():
    costs = gpu_costs()
    pinned = choose(GPUS, costs, rounds=64, work=16, size="64x64", pinned=True)
    assert pinned.lanes == tuple(GPUS) and pinned.why == "all 4 lanes: pinned"
    unknown = choose(GPUS, Costs({"cuda:0": 1.0}, None, 0.01, 0.1), 64, 16, "64x64")
    assert unknown.lanes == tuple(GPUS) and "not measured" in unknown.why


def test_cpu_workers_are_judged_against_one_process_on_all_the_cores():
    # two workers measured at 0.625 of the in-process rate each (the split gain): 1.25x in all
    local = 100.0
    worker = local * CPU_SPLIT_GAIN / 2
    costs = Costs({"cpu[0]": worker, "cpu[1]": worker}, None, 0.005, 0.05, cpu_lanes=2)
    # in-process prior from the workers: 1.25 x worker x 2 / 1.25 = 100 positions/s
    assert choose(["cpu[0]", "cpu[1]"], costs, 64, 100.0, "x").in_process  # 1 s vs 0.8 + 0.37 s
    assert choose(["cpu[0]", "cpu[1]"], costs, 64, 10_000.0, "x").lanes == ("cpu[0]", "cpu[1]")
    only_local = Costs({}, local, 0.005, 0.05, cpu_lanes=2)  # workers unmeasured: priors from in-process
    assert choose(["cpu[0]", "cpu[1]"], only_local, 64, 10_000.0, "x").lanes == ("cpu[0]", "cpu[1]")
    assert choose(["cpu[0]", "cpu[1]"], only_local, 64, 100.0, "x").in_process


def test_speeds_keep_rates_per_model_and_the_round_trip_from_the_least_waiting_lane():
    speeds = Speeds()
    speeds.rated("a", 1000, 2.0, "sd")
    speeds.rated("a", 1000, 0.5, "flux")
    assert speeds.of("sd") == {"a": 500.0} and speeds.of("flux") == {"a": 2000.0}
    assert speeds.rates["a"] == pytest.approx(1250.0)  # across models: only relative use
    speeds.synced(waited_s=3.0, rounds=60)  # waited on a slower partner
    speeds.synced(waited_s=0.3, rounds=60)  # the slowest lane waits the round trip alone
    assert speeds.round_s is None
    speeds.job_done()
    assert speeds.round_s == pytest.approx(0.005)
    speeds.synced(0.0, 0)  # a lane that had no rounds says nothing
    speeds.job_done()
    assert speeds.round_s == pytest.approx(0.005)
