"""ComfyUI's VIDEO type, as the running ComfyUI defines it, and the pack's PNG-sequence video.

``VideoInput`` keeps growing: 0.14 made ``as_trimmed`` abstract and ``save_to`` gained keyword
arguments (``bit_depth``, ``crf``, ``color_space``, ...) that core's Save Video passes. So
PngSequenceVideo implements what only it can do well (its frames, size, count, duration) and hands
everything else, including abstract methods this pack has never heard of, to core's own
``VideoFromComponents`` built from its frames.
"""
from __future__ import annotations

import abc
from fractions import Fraction

import numpy as np
import torch

try:  # imported through comfy_api.latest: importing comfy_api.input first is circular on 0.33
    from comfy_api.latest import Input, InputImpl, Types

    VideoInput = Input.Video
    VideoFromComponents, VideoFromFile = InputImpl.VideoFromComponents, InputImpl.VideoFromFile
    VideoComponents = Types.VideoComponents
except ImportError:  # pragma: no cover - a ComfyUI without the VIDEO type: no VIDEO output
    VideoInput = VideoFromComponents = VideoFromFile = VideoComponents = None


def read_audio(path: str) -> dict:
    """A sound file as ComfyUI's AUDIO: ``waveform`` ``[1, channels, samples]`` float32 in -1..1."""
    import av

    with av.open(path) as container:
        stream = container.streams.audio[0]
        planes = [f.to_ndarray() for f in container.decode(stream)]
        rate, channels, fmt = stream.rate, stream.codec_context.channels, stream.codec_context.format
    data = np.concatenate(planes, 1)
    if not fmt.is_planar:  # packed: one row of interleaved samples
        data = data.reshape(-1, channels).T
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return {"waveform": torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None], "sample_rate": rate}


def _delegated(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.materialize(), name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Core's VideoFromComponents.{name} on this sequence's frames."
    return method


if VideoInput is not None:
    class PngSequenceVideo(VideoInput):
        """A saved PNG sequence as ComfyUI's VIDEO: frames are read back only when a node asks."""

        def __init__(self, paths: list[str], fps: float, size: tuple[int, int], sound: str | None = None):
            self.paths, self.fps, self.size, self.sound = list(paths), float(fps), tuple(size), sound

        def get_components(self):
            from PIL import Image

            frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in self.paths])
            images = torch.from_numpy(frames).float() / 255.0
            audio = read_audio(self.sound) if self.sound else None
            return VideoComponents(images=images, audio=audio, frame_rate=Fraction(self.fps).limit_denominator(1001))

        def materialize(self):
            """Core's in-memory video of these frames (what every other method delegates to)."""
            return VideoFromComponents(self.get_components())

        def save_to(self, path, *args, **kwargs):
            return self.materialize().save_to(path, *args, **kwargs)

        def get_dimensions(self):
            return self.size

        def get_frame_count(self):
            return len(self.paths)

        def get_duration(self):
            return len(self.paths) / self.fps

    for _name in getattr(VideoInput, "__abstractmethods__", ()):
        if _name not in PngSequenceVideo.__dict__:
            setattr(PngSequenceVideo, _name, _delegated(_name))
    abc.update_abstractmethods(PngSequenceVideo)
else:  # pragma: no cover
    PngSequenceVideo = None

__all__ = ["PngSequenceVideo", "VideoComponents", "VideoFromComponents", "VideoFromFile", "VideoInput"]
