"""The ``devices`` string: what it accepts, and errors that list what is visible."""
import pytest

from parallel_vae.devices import Device, parse
from parallel_vae.errors import InputError


def names(devs):
    return [d.name for d in devs]


@pytest.mark.parametrize("spec, cuda, expected", [
    ("auto", 0, ["cpu"]),
    ("", 0, ["cpu"]),
    ("AUTO", 2, ["cuda:0", "cuda:1"]),
    ("cpu", 2, ["cpu"]),
    ("cpu:1", 0, ["cpu"]),
    ("cpu:2", 0, ["cpu[0]", "cpu[1]"]),
    ("cuda", 3, ["cuda:0", "cuda:1", "cuda:2"]),
    ("cuda:0, cuda:2", 3, ["cuda:0", "cuda:2"]),
    ("cuda:1,cpu", 2, ["cuda:1", "cpu"]),
])
def test_accepted(spec, cuda, expected):
    assert names(parse(spec, cuda_devices=cuda, cpu_cores=4)) == expected


def test_cpu_workers_know_their_share_and_torch_device():
    workers = parse("cpu:2", cuda_devices=0, cpu_cores=2)
    assert workers == [Device("cpu", 0, 2, pooled=True), Device("cpu", 1, 2, pooled=True)]
    assert {d.torch_device for d in workers} == {"cpu"}
    assert parse("cuda:1", cuda_devices=2)[0].torch_device == "cuda:1"
    # one CPU worker process is not ComfyUI's own CPU, though both are named "cpu"
    assert parse("cpu:1", cuda_devices=0) != parse("cpu", cuda_devices=0)
    assert names(parse("cpu:1", cuda_devices=0)) == names(parse("cpu", cuda_devices=0)) == ["cpu"]


@pytest.mark.parametrize("spec, cuda, fragment", [
    ("cuda:0", 0, "cuda:0 is not visible (visible: cpu)"),
    ("cuda:2", 2, "cuda:2 is not visible (visible: cpu, cuda:0, cuda:1)"),
    ("cuda", 0, "no CUDA device is visible (visible: cpu)"),
    ("gpu:0", 1, "'gpu:0' is not a device; use auto, cpu, cpu:N, cuda"),
    ("cpu:0", 0, "use cpu:1..cpu:8"),
    ("cpu:9", 0, "this machine has 4 cores"),
    ("cpu:two", 0, "needs a whole number"),
    ("cuda:0,cuda:0", 1, "names cuda:0 more than once"),
    ("cpu,cpu:2", 0, "names the CPU more than once"),
    ("cuda:0,,cuda:1", 2, "empty item"),
    ("auto,cpu", 0, "'auto' cannot be combined"),
])
def test_rejected_with_a_message_naming_the_input(spec, cuda, fragment):
    with pytest.raises(InputError) as e:
        parse(spec, cuda_devices=cuda, cpu_cores=4)
    assert e.value.input_name == "devices"
    assert str(e.value).startswith("devices: ")
    assert fragment in str(e.value)


def test_non_string_is_rejected():
    with pytest.raises(InputError, match="must be a string"):
        parse(3, cuda_devices=0)


def test_without_counts_parse_reads_the_machine(monkeypatch):
    import parallel_vae.devices as devices

    monkeypatch.setattr(devices, "cuda_count", lambda: 3)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 5)
    assert names(parse("auto")) == ["cuda:0", "cuda:1", "cuda:2"]
    assert names(parse("cuda:2")) == ["cuda:2"]
    with pytest.raises(InputError, match="this machine has 5 cores, so use cpu:1..cpu:10"):
        parse("cpu:11")
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    assert names(parse("auto")) == ["cpu"]


def test_which_device_lists_use_worker_processes():
    from parallel_vae.devices import uses_workers

    assert not uses_workers(parse("cpu", cuda_devices=0))
    assert not uses_workers(parse("auto", cuda_devices=0))
    assert not uses_workers(parse("cuda:1", cuda_devices=2))
    assert uses_workers(parse("cpu:1", cuda_devices=0))
    assert uses_workers(parse("cpu:2", cuda_devices=0, cpu_cores=2))
    assert uses_workers(parse("auto", cuda_devices=2))
    assert uses_workers(parse("cuda:0,cpu", cuda_devices=1))
    assert len(parse("cpu:4", cuda_devices=0, cpu_cores=2)) == 4, "up to twice the cores"


def test_ray_values_stand_alone_and_are_checked_without_a_cluster():
    assert parse("ray", cuda_devices=0) == [Device("ray", 0, pooled=True)]
    assert parse("RAY:CPU:3", cuda_devices=0) == [Device("ray", 3, pooled=True)]
    assert parse("ray:cpu:2", cuda_devices=0)[0].name == "ray:cpu:2"
    for bad, fragment in (("ray,cpu", "a Ray item stands alone"), ("ray:gpu", "is not a Ray device"),
                          ("ray:cpu:0", "use ray:cpu:1..ray:cpu:64"), ("ray:cpu:x", "needs a whole number")):
        with pytest.raises(InputError) as e:
            parse(bad, cuda_devices=0)
        assert e.value.input_name == "devices" and fragment in str(e.value), (bad, str(e.value))
