"""Sound in Save Video (Stream): AUDIO muxed into mp4 (AAC) and webm (Opus), a FLAC beside a PNG
sequence; as long as the video; carried by the VIDEO output; bad audio named, nothing written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from testkit import sound
from testkit.compare import latent

FPS = 12.0
FRAMES = 5  # a Wan 2.1 latent of 2 frames
SECONDS = FRAMES / FPS
pytestmark = pytest.mark.every_runtime  # the VIDEO output is read back by each runtime's own video type

# a 440 Hz tone's SNR after the codec, measured 36.1 dB (AAC, 44.1 kHz stereo) and 48.9 dB (Opus,
# 44.1 kHz resampled to 48 kHz); a gap, a repeated block or a wrong rate falls far below
MIN_SNR_DB = {"aac": 30.0, "opus": 40.0}


@pytest.fixture
def clip(load_vae, stream_of):
    wan = load_vae("wan21")
    return lambda: stream_of(latent((1, 16, 2, 8, 8), 61), wan, frames_per_batch=2)


@pytest.mark.parametrize("fmt,codec,rate,out_rate,channels,seconds", [
    ("mp4", "aac", 44100, 44100, 2, 2.0),     # longer than the video: cut at its end
    ("webm", "opus", 44100, 48000, 1, 0.25),  # shorter: the rest is silent; Opus needs 48 kHz
    ("png", "flac", 16000, 16000, 2, 2.0),
])
def test_sound_is_muxed_as_long_as_the_video_and_the_video_output_carries_it(clip, save, fmt, codec, rate, out_rate,
                                                                            channels, seconds, tmp_path):
    audio = sound.tone(rate, seconds, channels, batch=2)  # item 0 is used, as core's CreateVideo does
    audio["waveform"][1] = 0
    out, pictures = save(clip(), fmt, fps=FPS, audio=audio)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    sound_file = files[0] if fmt != "png" else next(p for p in files if p.suffix == ".flac")
    if fmt == "png":
        assert len(pictures) == FRAMES and sound_file.name == "clip_00001_.flac"
        assert out.ui["audio"][0]["filename"] == sound_file.name
    samples, got_rate, got_codec = sound.read(sound_file)
    assert (got_codec, got_rate, samples.shape[0]) == (codec, out_rate, channels)
    assert abs(samples.shape[1] / got_rate - SECONDS) <= 1 / FPS, "the sound lasts as long as the video"
    if codec == "flac":  # lossless: every sample, at 16 bits (as core's Save Audio writes FLAC)
        want = audio["waveform"][0, :, :round(SECONDS * rate)].numpy()
        want = np.clip(np.rint(want.astype(np.float64) * 32768), -32768, 32767)
        assert samples.shape == want.shape and np.array_equal(samples.astype(np.float64), want)
    else:
        tone_end = min(seconds, SECONDS)
        part = samples[0, int(0.03 * got_rate):int((tone_end - 0.03) * got_rate)]
        assert sound.tone_snr_db(part, got_rate) >= MIN_SNR_DB[codec]
        if seconds < SECONDS:
            rest = samples[:, int((seconds + 0.03) * got_rate):].astype(np.float64)
            assert rest.size and np.sqrt((rest ** 2).mean()) < 1e-2, "past the audio's end the video is silent"
    carried = out.result[0].get_components().audio  # what core's Save Video and later nodes get
    assert carried is not None and int(carried["sample_rate"]) == out_rate
    assert carried["waveform"].shape[1] == channels


@pytest.mark.parametrize("bad,match", [
    ("not audio", "expected ComfyUI's AUDIO"),
    ({"waveform": torch.zeros(1, 2, 0), "sample_rate": 44100}, "no samples"),
    ({"waveform": torch.zeros(0, 2, 10), "sample_rate": 44100}, "no samples"),
    ({"waveform": torch.full((1, 1, 100), float("nan")), "sample_rate": 44100}, "NaN or inf"),
    ({"waveform": torch.zeros(1, 1, 100), "sample_rate": 0}, "sample_rate"),
    ({"waveform": torch.zeros(1, 3, 100), "sample_rate": 44100}, "3 channels; mp4"),
    ({"waveform": torch.zeros(1, 100), "sample_rate": 44100}, r"\[batch, channels, samples\]"),
])
def test_bad_audio_is_named_and_nothing_is_written(clip, save, bad, match, tmp_path):
    with pytest.raises(ValueError, match=match) as info:
        save(clip(), "mp4", fps=FPS, audio=bad)
    assert str(info.value).startswith("audio:")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_png_sequence_takes_more_channels_in_its_flac(clip, save, tmp_path):
    out, _ = save(clip(), "png", fps=FPS, audio=sound.tone(8000, 1.0, channels=3))
    samples, rate, codec = sound.read(next(tmp_path.rglob("*.flac")))
    assert (codec, rate, samples.shape) == ("flac", 8000, (3, round(SECONDS * 8000)))
