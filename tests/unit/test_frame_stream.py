"""Streaming without ComfyUI: frame order, canvas-free blending, frame groups, and FrameStream's
ordering, batching, back-pressure, closing and error handling."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from parallel_vae import engine
from parallel_vae import plan as P
from parallel_vae.backends import InProcess, Local, Model
from parallel_vae.blend import allocate_output
from parallel_vae.devices import Device
from parallel_vae.errors import DecodeError
from parallel_vae.schedule import frame_groups, in_process_groups
from parallel_vae.stream import FrameStream

SCALES = (P.AxisScale(4, 3), P.AxisScale(8), P.AxisScale(8))


class StepDecoder:
    """A deterministic stand-in for a causal decoder, for engine bookkeeping only (the real Wan and
    TAEHV steppers are tested against ComfyUI in tests/comfy): each latent frame becomes its frames
    by nearest upsampling of a fixed channel mix."""

    def __init__(self):
        self.mix = torch.linspace(-1, 1, 3 * 16).reshape(3, 16, 1, 1, 1)
        self.alive = 0  # causal streams open at once
        self.most_alive = 0

    def _frames(self, z):
        x = F.conv3d(z, self.mix)
        return F.interpolate(x, scale_factor=(1, 8, 8), mode="nearest")

    def steps(self, box, step_frames):
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        try:
            for i, (f0, f1) in enumerate(step_frames):
                yield self._frames(box[:, :, i:i + 1]).repeat(1, 1, f1 - f0, 1, 1)
        finally:
            self.alive -= 1


def causal_plan(batch=1, frames=4):
    return P.plan_causal((batch, 16, frames, 10, 14), P.TileSettings(8, 2, 2, 1), SCALES)


def in_process(plan, z, decoder, order):
    """Every unit of ``plan`` decoded by the in-process backend with ``decoder``."""
    model = Model(None, local=lambda device, plan: Local(decoder, executor=lambda: None))
    return InProcess(Device("cpu", 0), free=lambda d: 0).results(plan, z, model, order)


def test_frame_order_walks_every_tile_of_a_frame_before_the_next_frame():
    plan = causal_plan(batch=2, frames=3)
    z = torch.randn(2, 16, 3, 10, 14)
    order = [(u.tile.batch, u.step, u.tile.index) for u in in_process(plan, z, StepDecoder(), "frame")]
    assert order == sorted(order) and len(order) == plan.units
    tile_order = [(u.tile.index, u.step) for u in in_process(plan, z, StepDecoder(), "tile")]
    assert tile_order == [(t.index, s) for t in plan.tiles for s in range(plan.steps)]
    assert in_process_groups(plan, "frame") == [tuple(t.index for t in plan.tiles_of(b)) for b in range(2)]


def test_canvas_free_segments_equal_the_canvas_decode_and_come_in_frame_order():
    plan, z = causal_plan(), torch.randn(1, 16, 4, 10, 14)
    storage, out = allocate_output(plan)
    tiled = StepDecoder()
    engine.decode(plan, z, in_process(plan, z, tiled, "tile"), out)
    assert tiled.most_alive == 1, "tile order keeps one causal cache at a time"
    decoder = StepDecoder()
    got = list(engine.segments(plan, z, in_process(plan, z, decoder, "frame"), engine.Report()))
    assert [engine.frame_range(plan, s) for s, _ in got] == [(0, 1), (1, 5), (5, 9), (9, 13)]
    joined = torch.cat([region for _, region in got], dim=2)
    assert torch.equal(joined, out), "same arithmetic, bit for bit"
    assert decoder.most_alive == len(plan.tiles), "frame order keeps every tile's causal cache"


def test_frame_groups_balance_volume_keep_plan_order_and_put_batch_items_in_order():
    plan = causal_plan(batch=2)
    groups = frame_groups(plan, 3)
    assert sorted(t.index for g in groups for t in g.tiles) == list(range(len(plan.tiles)))
    assert [g.tiles[0].batch for g in groups] == sorted(g.tiles[0].batch for g in groups)
    for g in groups:
        assert [t.index for t in g.tiles] == sorted(t.index for t in g.tiles)
        assert len({t.batch for t in g.tiles}) == 1
    assert len(frame_groups(plan, 1)) == 2 and len(frame_groups(plan, 99)) == len(plan.tiles)
    volumes = [g.volume for g in frame_groups(causal_plan(), 2)]
    assert max(volumes) - min(volumes) <= max(t.volume for t in causal_plan().tiles)


def source_of(parts, delay=0.0, fail_at=None, produced=None):
    """A segment source: ``parts`` are (start, n) in the order they finish."""
    def source(check):
        for i, (start, n) in enumerate(parts):
            check()
            if fail_at == i:
                raise DecodeError("the VAE failed")
            time.sleep(delay)
            if produced is not None:
                produced.append(start)
            yield start, torch.arange(start, start + n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 2, 2, 3)
    return source


def test_stream_reorders_segments_and_cuts_exact_batches():
    parts = [(1, 4), (0, 1), (9, 4), (5, 4), (13, 3)]  # out of order, uneven sizes
    with FrameStream(source_of(parts), total=16, frames_per_batch=3) as stream:
        batches = list(stream)
    assert [(b.start, b.frames.shape[0]) for b in batches] == [(0, 3), (3, 3), (6, 3), (9, 3), (12, 3), (15, 1)]
    assert torch.equal(torch.cat([b.frames[:, 0, 0, 0] for b in batches]), torch.arange(16.0))
    assert all(b.total == 16 for b in batches)


def test_a_slow_consumer_holds_the_producer_back():
    produced = []
    parts = [(i, 1) for i in range(40)]
    with FrameStream(source_of(parts, produced=produced), total=40, frames_per_batch=1, in_flight=2) as stream:
        first = next(iter(stream))
        time.sleep(0.5)  # the consumer is busy: the producer may fill the queue and no more
        assert first.start == 0
        assert len(produced) <= 1 + 2 + 1, produced  # taken + queued + the one waiting to be put
        rest = list(stream)
    assert len(rest) == 39


def test_closing_early_stops_the_producer_and_its_thread():
    produced = []
    stream = FrameStream(source_of([(i, 1) for i in range(1000)], delay=0.01, produced=produced), 1000, 1)
    next(iter(stream))
    stream.close()
    count = len(produced)
    time.sleep(0.2)
    assert len(produced) == count and count < 1000
    assert not [t for t in threading.enumerate() if t.name == "pvae-stream"]


def test_a_producer_error_reaches_the_consumer():
    with FrameStream(source_of([(0, 1), (1, 1)], fail_at=1), 2, 1) as stream:
        with pytest.raises(DecodeError, match="the VAE failed"):
            list(stream)


def test_a_missing_frame_is_an_error_not_a_short_video():
    with FrameStream(source_of([(0, 2), (3, 1)]), 4, 2) as stream:
        with pytest.raises(DecodeError, match="after 2 of 4 frames"):
            list(stream)


def test_the_consumers_poll_can_stop_a_stream_that_is_waiting():
    class Stop(Exception):
        pass

    calls = []

    def poll():
        calls.append(1)
        if len(calls) > 3:
            raise Stop

    stream = FrameStream(source_of([(0, 1)], delay=1.0), 1, 1, poll=poll)
    t0 = time.monotonic()
    with pytest.raises(Stop):
        list(stream)  # the poll runs while nothing arrives; closing waits for the unit in progress
    assert len(calls) == 4 and time.monotonic() - t0 < 2.0
