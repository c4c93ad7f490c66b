"""Parallel Tiled VAE Decode (Stream) and Stream to Images.

ComfyUI runs a node to completion before the next starts, so a stream is a recipe: the decode node
checks its inputs and returns a DecodeStream; the node consuming it calls ``open``, which runs the
decode while the consumer takes frame batches (parallel_vae/stream.py). Every consumer gets the
whole video: a stream consumed twice (two save nodes, or a cached stream re-used by a changed save
node) decodes again, and never hands out half a video.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

from ..parallel_vae import engine
from ..parallel_vae.errors import InputError
from ..parallel_vae.stream import FrameStream
from ._api import io, latent_node
from .decode import ParallelVAEDecode, decode_inputs
from .job import DecodeJob, to_frames
from .progress import NodeProgress

STREAM = io.Custom("PARALLEL_VAE_STREAM")
FRAMES_PER_BATCH_MAX = 4096
IN_FLIGHT = 2  # finished batches waiting for the consumer before the decode pauses
STREAM_DESCRIPTION = ("Parallel Tiled VAE Decode that hands frames on in batches while it decodes, to Save Video "
                      "(Stream) or Stream to Images: a long video never sits in memory whole. The decode runs when "
                      "the next node pulls the frames; each node that pulls them decodes again.")
TO_IMAGES_DESCRIPTION = ("Collects a Parallel Tiled VAE Decode (Stream) into one IMAGE batch for any other node (the "
                         "whole video in memory, as VAE Decode would give it).")


@dataclass
class DecodeStream:
    """The output of ParallelVAEDecodeStream: what to decode (checked), not the decoded frames.
    Nothing runs until a consumer opens it: no backend is reached, no worker started."""

    job: DecodeJob
    frames_per_batch: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        return self.job.out_shape[-1], self.job.out_shape[-2]

    def open(self) -> FrameStream:
        """Start decoding; iterate the result (in the node's thread) to get FrameBatch-es in order."""
        job = self.job
        stream: FrameStream

        def poll():  # in the decode thread: stop when the consumer stopped, or on ComfyUI's interrupt
            stream.check()
            NodeProgress.poll()

        run = job.start(poll, order="frame")  # in the node's thread: an in-process lane loads the model here

        def source(check):
            def on_unit(unit):
                check()
                run.progress.unit(unit)

            segments = engine.segments(run.plan, job.latent, run.units, engine.Report(),
                                       finish=job.finisher(run.progress), on_unit=on_unit)
            for segment, region in segments:
                frames = to_frames(region).contiguous()
                del region
                yield engine.frame_range(run.plan, segment)[0], frames
            run.progress.finish()

        context = contextvars.copy_context()  # the node's ids, so progress and previews land on it
        stream = FrameStream(source, run.plan.frames, self.frames_per_batch, in_flight=IN_FLIGHT,
                             poll=NodeProgress.poll, run_in=context.run)
        return stream


class ParallelVAEDecodeStream(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        # the optional ones (mode, sharding) stay last: frames_per_batch goes before them
        inputs = decode_inputs()[:-2] + [
            io.Int.Input("frames_per_batch", default=8, min=1, max=FRAMES_PER_BATCH_MAX,
                         tooltip="Frames handed on together. Memory holds about three batches (plus the tiles being "
                                 "decoded), whatever the length of the video."),
            *decode_inputs()[-2:],
        ]
        outputs = [STREAM.Output(display_name="FRAMES", tooltip="The decoded frames as a stream, for Save Video "
                                                                "(Stream) or Stream to Images.")]
        return latent_node("ParallelVAEDecodeStream", "Parallel Tiled VAE Decode (Stream)", STREAM_DESCRIPTION, inputs,
                           outputs, hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, tile_size=None, overlap=None, temporal_size=None, temporal_overlap=None,
                        devices=None, frames_per_batch=None, mode=None, sharding=None):
        if frames_per_batch is not None and not 1 <= frames_per_batch <= FRAMES_PER_BATCH_MAX:
            return f"frames_per_batch: {frames_per_batch} is outside 1..{FRAMES_PER_BATCH_MAX}"
        return ParallelVAEDecode.validate_inputs(tile_size, overlap, temporal_size, temporal_overlap, devices, mode,
                                                 sharding)

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                frames_per_batch, mode="auto", sharding=None) -> io.NodeOutput:
        if not isinstance(frames_per_batch, int) or not 1 <= frames_per_batch <= FRAMES_PER_BATCH_MAX:
            raise InputError("frames_per_batch", f"{frames_per_batch!r} is outside 1..{FRAMES_PER_BATCH_MAX}")
        job = DecodeJob.prepare(samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                                cls.hidden.unique_id if cls.hidden is not None else None, mode, sharding)
        return io.NodeOutput(DecodeStream(job, frames_per_batch))


def check_stream(frames) -> DecodeStream:
    if not isinstance(frames, DecodeStream):
        raise InputError("frames", f"expected the output of Parallel Tiled VAE Decode (Stream), "
                                   f"got {type(frames).__name__}")
    return frames


class ParallelVAEStreamToImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return latent_node("ParallelVAEStreamToImages", "Stream to Images", TO_IMAGES_DESCRIPTION,
                           [STREAM.Input("frames", tooltip="The stream to collect.")],
                           [io.Image.Output(tooltip="Every frame, in order.")])

    @classmethod
    def execute(cls, frames) -> io.NodeOutput:
        source = check_stream(frames)
        out = None
        with source.open() as stream:
            for batch in stream:
                if out is None:
                    out = torch.empty((batch.total,) + tuple(batch.frames.shape[1:]), dtype=torch.float32)
                out[batch.start:batch.start + batch.frames.shape[0]] = batch.frames
        return io.NodeOutput(out)
