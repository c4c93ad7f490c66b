"""Test tones as ComfyUI's AUDIO, and reading a saved file's sound back with PyAV."""
from __future__ import annotations

import math

import av
import numpy as np
import torch


def tone(rate: int, seconds: float, channels: int = 2, hz: float = 440.0, batch: int = 1) -> dict:
    """A sine at ``hz`` (each channel a different amplitude) as AUDIO ``[batch, channels, samples]``."""
    t = torch.arange(int(round(rate * seconds)), dtype=torch.float64) / rate
    wave = torch.stack([(0.5 - 0.1 * c) * torch.sin(2 * math.pi * hz * t) for c in range(channels)]).float()
    return {"waveform": wave[None].repeat(batch, 1, 1), "sample_rate": rate}


def read(path) -> tuple[np.ndarray, int, str]:
    """A file's first audio stream: (samples ``[channels, n]`` as decoded, in the codec's own
    sample type, sample rate, codec name)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        planes = [f.to_ndarray() for f in container.decode(stream)]
        ctx = stream.codec_context
        rate, channels, name, planar = stream.rate, ctx.channels, ctx.name, ctx.format.is_planar
    data = np.concatenate(planes, 1)
    if not planar:
        data = data.reshape(-1, channels).T
    return np.ascontiguousarray(data), rate, name


def write_flac(path, audio: dict) -> None:
    """AUDIO item 0 as a 16-bit FLAC file (for core's Load Audio)."""
    wave = audio["waveform"][0].numpy()
    layout = {1: "mono", 2: "stereo"}[wave.shape[0]]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("flac", rate=audio["sample_rate"], layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave), format="fltp", layout=layout)
        frame.sample_rate, frame.pts = audio["sample_rate"], 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def tone_snr_db(samples: np.ndarray, rate: int, hz: float = 440.0) -> float:
    """How clean a decoded tone is: the best-fitting sine at ``hz`` (any phase and amplitude, so
    codec delay does not matter) against what is left, in dB."""
    x = samples.astype(np.float64)
    t = np.arange(x.size) / rate
    basis = np.stack([np.sin(2 * np.pi * hz * t), np.cos(2 * np.pi * hz * t)], 1)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    fit = basis @ coef
    return 10 * math.log10(float((fit ** 2).sum()) / max(float(((x - fit) ** 2).sum()), 1e-30))
