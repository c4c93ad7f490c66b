"""The sound of a saved video: ComfyUI's AUDIO checked, then encoded alongside the frames as they
arrive, starting with the first frame and exactly as long as the video (cut, or padded with silence).

Each batch of frames is followed by the audio up to its end time, so the muxer never holds more than
a batch of either stream (writing all the sound at the end, as core's Save Video does, would make
the muxer buffer every video packet until then). The codec per container is core's: AAC in mp4,
Opus in webm; a PNG sequence gets a FLAC file beside it (16-bit, as core's Save Audio writes FLAC).
PyAV's encoder converts the sample format and, only where the codec cannot take the input's sample
rate, resamples (Opus: 48 kHz and its divisors; AAC: the MPEG rates).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from .errors import InputError

# video format -> (audio codec, file extension when the audio is a file of its own, channel counts)
CODECS = {
    "mp4": ("aac", None, (1, 2, 6)),
    "webm": ("libopus", None, (1, 2, 6)),
    "png": ("flac", "flac", tuple(range(1, 9))),
}
RESAMPLE_TO = 48000  # where the codec cannot take the input's rate
MAX_RATE = 655350  # FLAC's largest; far above anything core's audio nodes make


class Track:
    """One item's sound: ``waveform`` ``[channels, samples]`` float32 on the CPU, ``rate`` in Hz."""

    def __init__(self, waveform: torch.Tensor, rate: int):
        self.waveform, self.rate = waveform, rate

    @property
    def channels(self) -> int:
        return self.waveform.shape[0]

    def samples_for(self, seconds: float) -> int:
        """Samples from the start to ``seconds`` (a frame boundary of the video)."""
        return int(round(seconds * self.rate))


def check(audio, format: str) -> Optional[Track]:
    """ComfyUI's AUDIO (``{"waveform": [B, channels, samples], "sample_rate": int}``) as the Track
    of batch item 0 (what core's CreateVideo and Save Video use), or a clear error naming ``audio``."""
    if audio is None:
        return None
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise InputError("audio", f"expected ComfyUI's AUDIO (a dict with 'waveform' and 'sample_rate'), "
                                  f"got {type(audio).__name__}")
    wave, rate = audio["waveform"], audio["sample_rate"]
    if not isinstance(wave, torch.Tensor) or wave.dim() != 3:
        shape = list(wave.shape) if isinstance(wave, torch.Tensor) else type(wave).__name__
        raise InputError("audio", f"waveform must be a tensor [batch, channels, samples], got {shape}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate != int(rate) or not 0 < rate <= MAX_RATE:
        raise InputError("audio", f"sample_rate must be a whole number of Hz in 1..{MAX_RATE}, got {rate!r}")
    if wave.shape[0] == 0 or wave.shape[2] == 0:
        raise InputError("audio", f"has no samples (waveform {list(wave.shape)})")
    codec, _, counts = CODECS[format]
    if wave.shape[1] not in counts:
        raise InputError("audio", f"has {wave.shape[1]} channels; {format} ({codec}) takes "
                                  f"{', '.join(map(str, counts[:-1]))} or {counts[-1]}")
    if not wave.is_floating_point():
        raise InputError("audio", f"waveform must hold floats in -1..1, not {wave.dtype}")
    item = wave[0].detach().to("cpu", torch.float32)
    if not torch.isfinite(item).all():
        raise InputError("audio", "waveform holds NaN or inf samples")
    return Track(item.contiguous(), int(rate))


LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}  # FFmpeg's defaults


class AudioOut:
    """A Track encoded into ``container`` (the video's, or a file of its own) up to a time."""

    def __init__(self, container, track: Track, format: str):
        import av

        codec = CODECS[format][0]
        rates = av.codec.Codec(codec, "w").audio_rates
        rate = track.rate if not rates or track.rate in rates else RESAMPLE_TO
        self.track, self.container = track, container
        self.layout = LAYOUTS[track.channels]
        self.stream = container.add_stream(codec, rate=rate, layout=self.layout)
        self.sent = 0  # samples of the track handed to the encoder

    def until(self, seconds: float) -> None:
        """Encode the track up to ``seconds`` from its start (silence past its end)."""
        import av

        end = self.track.samples_for(seconds)
        if end <= self.sent:
            return
        have = self.track.waveform[:, self.sent:end]
        chunk = have.numpy()
        if chunk.shape[1] < end - self.sent:
            chunk = np.concatenate([chunk, np.zeros((chunk.shape[0], end - self.sent - chunk.shape[1]), np.float32)], 1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self.layout)
        frame.sample_rate = self.track.rate
        frame.time_base = Fraction(1, self.track.rate)
        frame.pts = self.sent
        self.container.mux(self.stream.encode(frame))
        self.sent = end

    def finish(self, seconds: float) -> None:
        self.until(seconds)
        self.container.mux(self.stream.encode(None))
