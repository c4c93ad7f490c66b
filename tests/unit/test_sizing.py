"""tile_size 0 (auto): the tile from free memory and a per-pixel estimate, without ComfyUI."""
from __future__ import annotations

from parallel_vae import sizing
from parallel_vae.devices import Device
from parallel_vae.plan import TILE_MAX, TILE_MIN

SD_LIKE = sizing.Cost(fixed=0.0, per_px=8712.0)  # ComfyUI's SD estimate in float32: 2178 x 4 bytes


def test_the_tile_shrinks_with_free_memory_and_stays_in_bounds():
    sides = [sizing.largest_tile(SD_LIKE, mib << 20) for mib in (10_000_000, 4096, 1024, 256, 64, 1)]
    assert sides == sorted(sides, reverse=True) and len(set(sides)) > 3
    assert sides[0] == TILE_MAX and sides[-1] == TILE_MIN
    assert all(s % sizing.STEP == 0 for s in sides)
    for side, mib in zip(sides[1:4], (4096, 1024, 256)):
        assert SD_LIKE.bytes(side) <= sizing.FRACTION * (mib << 20) < SD_LIKE.bytes(side + 2 * sizing.STEP)


def test_a_fixed_cost_leaves_less_for_pixels():
    free = 1024 << 20
    assert sizing.largest_tile(sizing.Cost(400 << 20, 8712.0), free) < sizing.largest_tile(SD_LIKE, free)


def test_every_device_must_hold_the_tile_and_the_reason_names_the_tightest():
    choice = sizing.choose(SD_LIKE, [("cuda:0", 8 << 30), ("cuda:1", 1 << 30)])
    # 1 GiB: 0.6 x 2^30 bytes / 8712 bytes per pixel = 73,949 pixels, a 271-pixel square: 256 in steps of 32
    assert choice.tile_size == 256
    assert choice.why.startswith(f"auto {choice.tile_size} px: cuda:1 has 1.0 GiB free")
    assert "may not fit" in sizing.choose(SD_LIKE, [("cpu", 1 << 20)]).why


def test_the_memory_limit_caps_every_device(monkeypatch):
    cpu = Device("cpu", 0)
    monkeypatch.setattr(sizing, "cpu_available", lambda: 8 << 30)
    monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, "300")
    assert sizing.free_bytes(cpu) == 300 << 20
    assert sizing.free_bytes(cpu, own=100 << 20) == 100 << 20
    monkeypatch.delenv(sizing.MEMORY_LIMIT_ENV)
    assert sizing.free_bytes(cpu) == 8 << 30
    assert sizing.free_bytes(cpu, cpu_workers=2) == 4 << 30, "CPU workers share the available RAM"


def test_the_memory_limit_can_name_devices(monkeypatch):
    monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, "cpu[0]=100, cpu[1]=300")
    first, second = Device("cpu", 0, 2, True), Device("cpu", 1, 2, True)
    assert sizing.free_bytes(first, own=1 << 40) == 100 << 20
    assert sizing.free_bytes(second, own=1 << 40) == 300 << 20
    assert sizing.free_bytes(Device("cpu", 0), own=1 << 40) == 1 << 40, "a device not named has no cap"
