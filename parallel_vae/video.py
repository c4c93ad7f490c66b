"""Write frame batches to a video file (PyAV) or a lossless PNG sequence as they arrive.

With a Track (audio.py), the sound follows each batch up to its last frame's end: in the video file
for mp4 and webm, in a FLAC file beside a PNG sequence.

Frames are ComfyUI IMAGE batches ``[n, H, W, C]`` in 0..1. They become 8-bit exactly as ComfyUI's
SaveImage does it (``clip(255 * x, 0, 255)`` truncated to uint8), so a PNG sequence holds the same
bytes SaveImage would write for the same IMAGE.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from .audio import AudioOut, Track
from .errors import InputError

# format -> (container extension, codec, pixel format, largest crf)
FORMATS = {
    "mp4": ("mp4", "libx264", "yuv420p", 51),
    "webm": ("webm", "libvpx-vp9", "yuv420p", 63),
    "png": ("png", "png", "rgb24", None),
}
CRF_MAX = 63


def check_options(format: str, fps: float, crf: int) -> None:
    if format not in FORMATS:
        raise InputError("format", f"{format!r} is not one of {', '.join(FORMATS)}")
    if not (isinstance(fps, (int, float)) and fps > 0 and fps == fps and fps != float("inf")):
        raise InputError("fps", f"{fps!r} must be a number greater than 0")
    top = FORMATS[format][3]
    if top is not None and not 0 <= crf <= top:
        raise InputError("crf", f"{crf} is outside 0..{top} for {format}")


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[n, H, W, C]`` float in 0..1 -> uint8 RGB, the way ComfyUI's SaveImage converts."""
    array = 255.0 * frames.detach().to("cpu", torch.float32).numpy()
    array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


class VideoWriter:
    """``write`` batches, then ``close`` (returns the file names) or ``abort`` (removes them)."""

    def __init__(self, folder: str, stem: str, format: str, fps: float, crf: int,
                 metadata: Optional[dict[str, str]] = None, audio: Optional[Track] = None):
        check_options(format, fps, crf)
        self.folder, self.stem, self.format = folder, stem, format
        self.fps, self.crf, self.metadata = fps, crf, dict(metadata or {})
        self.track = audio
        self.files: list[str] = []
        self.frames = 0
        self._container = self._stream = self._codec = None
        self._audio: Optional[AudioOut] = None
        self._sound = None  # the FLAC file's container beside a PNG sequence
        self.size: Optional[tuple[int, int]] = None  # (width, height)

    def _open(self, width: int, height: int) -> None:
        import av

        ext, codec, pix_fmt, _ = FORMATS[self.format]
        self.size = (width, height)
        if self.format == "png":
            self._codec = av.CodecContext.create(codec, "w")
            self._codec.width, self._codec.height, self._codec.pix_fmt = width, height, pix_fmt
            if self.track is not None:
                self._sound = self._create(f"{self.stem}.flac")
                self._audio = AudioOut(self._sound, self.track, self.format)
            return
        if width % 2 or height % 2:
            raise InputError("format", f"{self.format} needs an even width and height, not {width}x{height}; "
                                       f"use png")
        options = {"movflags": "use_metadata_tags"} if self.format == "mp4" else {}  # keep custom tags in mp4
        self._container = self._create(f"{self.stem}.{ext}", options)
        stream = self._container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        options = {"crf": str(self.crf)}
        if self.format == "webm":
            options.update({"b:v": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"})
        stream.options = options
        self._stream = stream
        if self.track is not None:
            self._audio = AudioOut(self._container, self.track, self.format)

    def _create(self, name: str, options: Optional[dict] = None):
        import av

        self.files.append(name)  # before opening: abort() removes even a half-written file
        container = av.open(os.path.join(self.folder, name), mode="w", options=options or {})
        for key, value in self.metadata.items():
            container.metadata[key] = value
        return container

    def write(self, frames: torch.Tensor) -> None:
        import av

        pixels = to_uint8(frames)
        if self.size is None:
            self._open(pixels.shape[2], pixels.shape[1])
        elif (pixels.shape[2], pixels.shape[1]) != self.size:
            raise ValueError(f"frame size {pixels.shape[2]}x{pixels.shape[1]} changed from {self.size}")
        for image in pixels:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if self.format == "png":
                name = f"{self.stem}{self.frames:05}.png"
                self.files.append(name)
                with open(os.path.join(self.folder, name), "wb") as f:
                    for packet in self._codec.encode(frame):
                        f.write(bytes(packet))
            else:
                self._container.mux(self._stream.encode(frame))
            self.frames += 1
        if self._audio is not None:
            self._audio.until(self.frames / self.fps)

    def close(self) -> list[str]:
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
        if self._audio is not None:
            self._audio.finish(self.frames / self.fps)
            self._audio = None
        for container in (self._container, self._sound):
            if container is not None:
                container.close()
        self._container = self._sound = None
        return list(self.files)

    def abort(self) -> None:
        """Drop what was written (an interrupted or failed save leaves no partial file behind)."""
        for container in (self._container, self._sound):
            if container is not None:
                try:
                    container.close()
                except Exception:
                    pass
        self._container = self._sound = self._audio = None
        for name in self.files:
            try:
                os.remove(os.path.join(self.folder, name))
            except FileNotFoundError:
                pass
        self.files = []
