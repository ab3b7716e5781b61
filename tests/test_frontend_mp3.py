"""Stereo MP3 through the front end: the channels are averaged as the original's pydub decoding did.

The original read files ending in `.mp3` with pydub: ffmpeg decodes to 16-bit PCM (rounding), `audioop.ratecv`
resamples every channel, `audioop.tomono` mixes down (`floor(0.5 * l + 0.5 * r)`) and the samples are divided by
32767. Every other format kept the first channel. The reference below redoes that arithmetic in numpy from the
decoded samples, independently of the front end; the files are made by the tests.
"""

import math

import numpy as np
import pytest
import soundfile as sf
import soxr

from transformers_af2 import AudioFlamingo2FeatureExtractor

pytestmark = pytest.mark.skipif(
    "MP3" not in sf.available_formats(), reason="this libsndfile cannot write MP3 (needs libsndfile >= 1.1)"
)

SECONDS = 3.0


@pytest.fixture(scope="module")
def extractor():
    # 1 s windows, 3 of them: the 3 s files fill every window, so no padding dilutes the comparison.
    return AudioFlamingo2FeatureExtractor(window_length=1.0, max_num_window=3)


def band_limited_noise(rate, seconds, seed, top_hz=7000.0):
    """White noise with nothing above `top_hz`: content in every mel band, none that aliases."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(int(seconds * rate)))
    spectrum[np.fft.rfftfreq(int(seconds * rate), 1 / rate) > top_hz] = 0
    noise = np.fft.irfft(spectrum, n=int(seconds * rate))
    return noise / np.abs(noise).max()


def stereo_mp3(path, rate):
    """Left: a 440 Hz tone over quiet noise; right: 1 kHz and 2.5 kHz tones over other noise."""
    t = np.arange(int(SECONDS * rate)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1 * band_limited_noise(rate, SECONDS, seed=1)
    right = (
        0.3 * np.sin(2 * np.pi * 2500 * t)
        + 0.3 * np.sin(2 * np.pi * 1000 * t) * (t % 1 < 0.5)
        + 0.1 * band_limited_noise(rate, SECONDS, seed=2)
    )
    sf.write(path, np.stack([left, right], axis=1), rate, format="MP3")
    return path


def audioop_ratecv(pcm, in_rate, out_rate):
    """`audioop.ratecv(data, 2, channels, in_rate, out_rate, None)` on int16 `(frames, channels)`: linear
    interpolation at `j * in / out` in 32-bit fixed point, truncated, shifted back to 16 bits."""
    divisor = math.gcd(in_rate, out_rate)
    step_in, step_out = in_rate // divisor, out_rate // divisor
    outputs = np.arange((len(pcm) - 1) * step_out // step_in + 1, dtype=np.int64)
    current = -((-outputs * step_in) // step_out)  # ceil(j * in / out): the input sample at or after j
    distance = (current * step_out - outputs * step_in)[:, None].astype(np.float64)
    wide = pcm.astype(np.int64) << 16
    previous = np.where((current >= 1)[:, None], wide[np.maximum(current - 1, 0)], 0)
    value = np.trunc((previous * distance + wide[current] * (step_out - distance)) / step_out).astype(np.int64)
    return value >> 16


def original_mp3_waveform(path, resample="soxr"):
    """The original's MP3 reading, at 16 kHz: int16 PCM, per-channel resampling, tomono, / 32767."""
    decoded, rate = sf.read(path, dtype="float32", always_2d=True)  # stands in for ffmpeg's decoder
    pcm = np.clip(np.rint(decoded.astype(np.float64) * 32768), -32768, 32767)  # ffmpeg's float -> s16
    if rate != 16000:
        if resample == "audioop":
            pcm = audioop_ratecv(pcm.astype(np.int16), rate, 16000).astype(np.float64)
        else:  # REFERENCE.md: audioop is gone from Python 3.13; soxr resamples instead
            pcm = soxr.resample(pcm, rate, 16000, quality="HQ")
    mono = np.clip(np.floor(0.5 * pcm[:, 0] + 0.5 * pcm[:, 1]), -32768, 32767)
    return (mono / np.iinfo(np.int16).max).astype(np.float32)


def log_mel_of_waveform(extractor, waveform):
    return extractor(waveform, sampling_rate=16000)["input_features"]


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_stereo_mp3_averages_the_channels_like_the_original(extractor, tmp_path, rate):
    path = stereo_mp3(tmp_path / f"stereo_{rate}.mp3", rate)
    reference = log_mel_of_waveform(extractor, original_mp3_waveform(path))
    got = extractor(str(path))["input_features"]
    assert got.shape == reference.shape == (1, 3, 101, 64)
    mean_db = (got - reference).abs().mean().item()
    assert mean_db <= 0.5, f"{rate} Hz stereo MP3: {mean_db:.3f} dB from the original's average"
    # The first channel alone (what every other format uses, and what MP3 gave before) is far from it.
    decoded, file_rate = sf.read(path, dtype="float32", always_2d=True)
    first_channel = extractor(decoded[:, 0], sampling_rate=file_rate)["input_features"]
    assert (first_channel - reference).abs().mean().item() > 2.0


def test_mp3_from_bytes_and_file_object_average_too(extractor, tmp_path):
    path = stereo_mp3(tmp_path / "stereo.mp3", 16000)
    from_path = extractor(str(path))["input_features"]
    data = path.read_bytes()
    assert (extractor(data)["input_features"] - from_path).abs().max().item() == 0
    with open(path, "rb") as handle:
        assert (extractor(handle)["input_features"] - from_path).abs().max().item() == 0


def test_stereo_wav_still_keeps_the_first_channel(extractor, tmp_path):
    decoded, rate = sf.read(stereo_mp3(tmp_path / "s.mp3", 16000), always_2d=True)
    sf.write(tmp_path / "s.wav", decoded, rate, subtype="FLOAT")
    from_wav = extractor(str(tmp_path / "s.wav"))["input_features"]
    first = extractor(decoded[:, 0].astype(np.float32), sampling_rate=rate)["input_features"]
    assert (from_wav - first).abs().max().item() == 0


@pytest.mark.parametrize(("rate", "bound_db"), [(16000, 0.01), (48000, 0.1), (44100, 1.0)])
def test_difference_to_audioop_resampling_is_the_documented_one(extractor, tmp_path, rate, bound_db):
    """The one step not reproduced: audioop.ratecv interpolates linearly without an anti-alias filter. Same rate or
    an integer ratio: (almost) no difference; 44.1 kHz: under 1 dB mean on content below 7 kHz (docs/bad-inputs.md)."""
    path = stereo_mp3(tmp_path / f"stereo_{rate}.mp3", rate)
    exact = log_mel_of_waveform(extractor, original_mp3_waveform(path, resample="audioop"))
    mean_db = (extractor(str(path))["input_features"] - exact).abs().mean().item()
    assert mean_db <= bound_db, f"{rate} Hz: {mean_db:.3f} dB from the audioop resampling"
