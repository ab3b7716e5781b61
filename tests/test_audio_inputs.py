"""Real-world and bad audio through the front end: formats, rates, channels, layouts, and the documented errors.

Every file is made by the test itself. docs/bad-inputs.md points at these tests row by row.
"""

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.testing_utils import CaptureLogger

from transformers_af2 import AudioFlamingo2FeatureExtractor
from transformers_af2.processing import feature_extraction_audioflamingo2 as fe_module

RATE = 16000


@pytest.fixture(scope="module")
def extractor():
    # Short windows keep the tests fast; every rule is the same as with the released 10 s x 12.
    return AudioFlamingo2FeatureExtractor(window_length=1.0, max_num_window=3)


def tone(seconds, rate, channels=1, freq=440.0, amplitude=0.5):
    t = np.arange(int(seconds * rate)) / rate
    first = amplitude * np.sin(2 * np.pi * freq * t)
    rng = np.random.default_rng(0)
    others = [0.3 * rng.standard_normal(len(t)) for _ in range(channels - 1)]
    return np.stack([first, *others], axis=1) if channels > 1 else first


def features_of(extractor, audio, **kwargs):
    out = extractor([audio], return_tensors="pt", **kwargs)
    features, mask = out["input_features"], out["input_features_mask"]
    assert torch.isfinite(features).all()
    return features, mask


@pytest.mark.parametrize(
    ("fmt", "subtype", "suffix", "tolerance"),
    [
        ("WAV", "PCM_U8", ".wav", 0.5),
        ("WAV", "PCM_16", ".wav", 0.05),
        ("WAV", "PCM_24", ".wav", 0.05),
        ("WAV", "PCM_32", ".wav", 0.05),
        ("WAV", "FLOAT", ".wav", 0.05),
        ("FLAC", "PCM_16", ".flac", 0.05),
        ("OGG", "VORBIS", ".ogg", 6.0),
        ("MP3", "MPEG_LAYER_III", ".mp3", 6.0),
    ],
)
def test_file_formats_decode_like_the_array(extractor, tmp_path, fmt, subtype, suffix, tolerance):
    """Each format gives the log-mel of the same tone passed as an array (lossy codecs within a few dB)."""
    signal = tone(1.5, RATE)
    path = tmp_path / f"tone{suffix}"
    sf.write(path, signal, RATE, format=fmt, subtype=subtype)
    from_file, mask = features_of(extractor, str(path))
    from_array, _ = features_of(extractor, signal, sampling_rate=RATE)
    assert mask.tolist() == [[1, 1]]
    # Compare the loud bins (the tone), where codecs keep the signal.
    loud = from_array > from_array.max() - 30
    assert (from_file[loud] - from_array[loud]).abs().median().item() < tolerance


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000, 192000])
def test_sample_rates_are_resampled_to_16k(extractor, tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, tone(2.5, rate), rate, subtype="FLOAT")
    waveform = extractor.load_audio(str(path))
    assert abs(len(waveform) - 2.5 * RATE) <= 2
    _, mask = features_of(extractor, str(path))
    assert mask.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("channels", [1, 2, 6, 8])
def test_multichannel_files_keep_the_first_channel(extractor, tmp_path, channels):
    signal = tone(1.2, RATE, channels=channels)
    path = tmp_path / f"ch{channels}.wav"
    sf.write(path, signal, RATE, subtype="FLOAT")
    first_channel = signal[:, 0] if channels > 1 else signal
    expected = extractor.split_windows(extractor.load_audio(first_channel, RATE))
    got = extractor.split_windows(extractor.load_audio(str(path)))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_two_dimensional_arrays_use_the_first_channel(extractor, layout):
    signal = tone(1.2, RATE, channels=2)
    array = signal.T if layout == "channels_first" else signal
    got = extractor.split_windows(extractor.load_audio(array, RATE))
    expected = extractor.split_windows(extractor.load_audio(signal[:, 0], RATE))
    np.testing.assert_array_equal(got, expected)


def test_bytes_file_objects_tensors_and_dataset_dicts_agree(extractor, tmp_path):
    signal = tone(1.2, RATE).astype(np.float32)
    path = tmp_path / "t.wav"
    sf.write(path, signal, RATE, subtype="FLOAT")
    data = path.read_bytes()
    reference = extractor.split_windows(extractor.load_audio(str(path)))
    variants = [
        data,
        io.BytesIO(data),
        torch.from_numpy(signal),
        {"array": signal, "sampling_rate": RATE},
        {"path": str(path)},
        {"bytes": data, "path": None},
    ]
    for variant in variants:
        rate = RATE if isinstance(variant, torch.Tensor) else None
        np.testing.assert_array_equal(extractor.split_windows(extractor.load_audio(variant, rate)), reference)


def test_float_file_with_peaks_above_one_is_divided_by_its_peak(extractor, tmp_path):
    signal = tone(1.0, RATE, amplitude=5.0)
    signal[100] = -7.0
    path = tmp_path / "loud.wav"
    sf.write(path, signal, RATE, subtype="FLOAT")
    waveform = extractor.load_audio(str(path))
    assert np.abs(waveform).max() == pytest.approx(1.0)
    np.testing.assert_allclose(waveform, signal / 7.0, atol=1e-6)


def test_long_audio_is_truncated_with_a_warning(extractor, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(4.5, RATE), RATE)
    with CaptureLogger(fe_module.logger) as captured:
        _, mask = features_of(extractor, str(path))
    assert mask.tolist() == [[1, 1, 1]]
    assert "the last 1.5 s are dropped" in captured.out
    wider = AudioFlamingo2FeatureExtractor(window_length=1.0, max_num_window=5)
    assert features_of(wider, str(path))[1].tolist() == [[1, 1, 1, 1, 1]]


def test_one_hour_file_reads_only_what_is_used(extractor, tmp_path, monkeypatch):
    path = tmp_path / "hour.wav"
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_16") as handle:
        block = (tone(60, 8000) * 0.5).astype(np.float32)
        for _ in range(60):
            handle.write(block)
    reads = []
    original_read = sf.SoundFile.read

    def spy(self, *args, **kwargs):
        block = original_read(self, *args, **kwargs)
        reads.append(len(block))
        return block

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    _, mask = features_of(extractor, str(path))
    assert mask.tolist() == [[1, 1, 1]]
    assert sum(reads) == 3 * 8000


def test_short_audio_gives_one_padded_window(extractor):
    features, mask = features_of(extractor, tone(0.05, RATE), sampling_rate=RATE)
    assert mask.tolist() == [[1]] and features.shape[1] == 1


def test_audio_shorter_than_one_output_sample_resamples_like_librosa(extractor):
    """librosa (the original) fixes the resampled length to ceil(n * ratio): 1 sample at 48 kHz -> 1 sample."""
    waveform = extractor.load_audio(np.array([0.5]), 48000)
    assert waveform.shape == (1,)
    features, mask = features_of(extractor, np.array([0.5]), sampling_rate=48000)
    assert mask.tolist() == [[1]]


def test_silent_audio_is_encoded_as_silence(extractor):
    with CaptureLogger(fe_module.logger) as captured:
        features, _ = features_of(extractor, np.zeros(RATE), sampling_rate=RATE)
    assert "silent" in captured.out
    assert torch.allclose(features, torch.full_like(features, -100.0))


@pytest.mark.parametrize(
    ("audio", "kwargs", "error", "message"),
    [
        (np.array([0.1, np.nan, 0.2] * 100), {"sampling_rate": RATE}, ValueError, r"audio\[0\]: .*NaN or infinite"),
        (np.array([0.1, np.inf] * 100), {"sampling_rate": RATE}, ValueError, "NaN or infinite"),
        (np.zeros(0), {"sampling_rate": RATE}, ValueError, r"audio\[0\]: the audio is empty"),
        (np.zeros(100, dtype=np.int64), {"sampling_rate": RATE}, TypeError, "got dtype int64"),
        (np.zeros(100, dtype=np.complex64), {"sampling_rate": RATE}, TypeError, "got dtype complex64"),
        (np.zeros((20, 30)), {"sampling_rate": RATE}, ValueError, r"got shape \(20, 30\)"),
        (np.zeros(100), {}, ValueError, "sampling_rate is required"),
        (np.zeros(100), {"sampling_rate": "16k"}, ValueError, "sampling_rate must be a positive integer"),
        (np.zeros(100), {"sampling_rate": 16000.5}, ValueError, "sampling_rate must be a positive integer"),
    ],
)
def test_bad_arrays_raise_clear_errors(extractor, audio, kwargs, error, message):
    with pytest.raises(error, match=message):
        extractor([audio], **kwargs)


def test_float16_array_is_accepted(extractor):
    features, _ = features_of(extractor, tone(1.0, RATE).astype(np.float16), sampling_rate=RATE)
    assert features.shape[1] == 1


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (b"", ".wav", "cannot decode"),
        (b"this is not audio at all\n" * 10, ".wav", "cannot decode"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", ".wav", "cannot decode"),
        (b"fLaC\x00\x00\x00\x22", ".flac", "cannot decode"),
        (b"ID3\x03\x00\x00\x00\x00\x00\x00\xff\xfb", ".mp3", "cannot decode"),
        (b"\x00\x01\x02\x03" * 50, ".xyz", "cannot decode"),
    ],
)
def test_corrupt_or_unsupported_files_raise_clear_errors(extractor, tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path.name}: {message}"):
        extractor([str(path)])


def test_truncated_wav_decodes_what_is_there(extractor, tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, tone(2.0, RATE), RATE, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    try:
        features, mask = features_of(extractor, str(path))
    except ValueError as error:  # libsndfile may also refuse a header whose size disagrees with the file
        assert "cannot decode" in str(error)
    else:
        assert mask.shape[1] >= 1 and torch.isfinite(features).all()


def test_missing_file_names_the_path(extractor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav: no such audio file"):
        extractor([str(tmp_path / "nope.wav")])


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(min_value=1, max_value=40000),
    rate=st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]),
    amplitude=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    offset=st.floats(min_value=-2.0, max_value=2.0, allow_nan=False),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    channels=st.integers(min_value=1, max_value=3),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
)
def test_front_end_fuzz(length, rate, amplitude, offset, dtype, channels, poison):
    """Any float input gives finite features of the right shape, or one of the documented errors."""
    extractor = AudioFlamingo2FeatureExtractor(window_length=1.0, max_num_window=3)
    rng = np.random.default_rng(length)
    signal = (rng.standard_normal((length, channels)) * amplitude + offset).astype(dtype)
    if channels == 1:
        signal = signal[:, 0]
    if poison is not None:
        signal.flat[rng.integers(0, signal.size)] = poison
    try:
        out = extractor([signal], sampling_rate=rate)
    except ValueError as error:
        message = str(error)
        non_finite = not np.isfinite(signal.astype(np.float64)).all()
        assert (
            non_finite
            and "NaN or infinite" in message
            or (length <= 8 and channels > 1 and "expected a 1-D mono waveform" in message)
        ), message
        return
    features, mask = out["input_features"], out["input_features_mask"]
    assert torch.isfinite(features).all()
    windows = mask.shape[1]
    assert 1 <= windows <= 3 and features.shape == (1, windows, 101, 64)
