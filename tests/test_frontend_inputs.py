"""Bad inputs and settings at the front end: each gets a clear error naming the input, or works.

Sampling rates outside 1 kHz..768 kHz, file names that are not UTF-8, directories, the batch index in errors,
and feature extractor settings checked at construction. docs/bad-inputs.md points at these tests row by row.
"""

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from transformers_af2 import AudioFlamingo2FeatureExtractor
from transformers_af2.processing.feature_extraction_audioflamingo2 import MAX_SAMPLING_RATE, MIN_SAMPLING_RATE

RATE = 16000


@pytest.fixture(scope="module")
def extractor():
    return AudioFlamingo2FeatureExtractor(window_length=1.0, max_num_window=3)


def tone(seconds=1.2, rate=RATE):
    return 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)


def wav_bytes(signal, rate=RATE):
    buffer = io.BytesIO()
    sf.write(buffer, signal, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# -- sampling rates ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [2**50, 10**10, 2**45, 768_001, 999, 1])
def test_array_rate_outside_the_range_is_refused_up_front(extractor, rate):
    """2**50 Hz used to hang inside soxr (Ctrl-C could not stop it); 1e10 Hz silently encoded silence."""
    with pytest.raises(ValueError, match=rf"audio\[0\]: sampling_rate is {rate} Hz, outside the 1000\.\.768000 Hz"):
        extractor([np.full(1000, 0.1)], sampling_rate=rate)


@pytest.mark.parametrize("rate", [MIN_SAMPLING_RATE, MAX_SAMPLING_RATE])
def test_rates_at_the_limits_are_accepted(extractor, rate):
    out = extractor([tone(0.5, rate)], sampling_rate=rate)
    assert torch.isfinite(out["input_features"]).all() and out["input_features_mask"].tolist() == [[1]]


@pytest.mark.parametrize("rate", [500, 1_000_000])
def test_file_with_a_rate_outside_the_range_is_refused(extractor, tmp_path, rate):
    path = tmp_path / f"rate_{rate}.wav"
    sf.write(path, np.full(2000, 0.1), rate, subtype="PCM_16")
    with pytest.raises(ValueError, match=rf"rate_{rate}\.wav: the file's sampling rate is {rate} Hz, outside"):
        extractor([str(path)])


@pytest.mark.parametrize("rate", [16000.0, 1e10, "16k", True])
def test_rate_that_is_not_a_whole_number_of_hz_is_refused(extractor, rate):
    with pytest.raises(ValueError, match="sampling_rate must be a positive integer in Hz"):
        extractor([np.full(1000, 0.1)], sampling_rate=rate)


# -- file names and paths ----------------------------------------------------------------------------------------
def test_non_utf8_file_name_is_read(extractor, tmp_path):
    raw_name = os.fsencode(tmp_path) + b"/caf\xe9 \xff.wav"
    with open(raw_name, "wb") as handle:
        handle.write(wav_bytes(tone()))
    name = os.fsdecode(raw_name)  # what os.listdir / sys.argv give: undecodable bytes as surrogate escapes
    from_name = extractor([name])["input_features"]
    from_bytes = extractor([wav_bytes(tone())])["input_features"]
    assert torch.equal(from_name, from_bytes)


def test_missing_non_utf8_file_gives_a_printable_error(extractor, tmp_path):
    name = os.fsdecode(os.fsencode(tmp_path) + b"/gone \xe9.wav")
    with pytest.raises(FileNotFoundError) as caught:
        extractor([name])
    message = str(caught.value)
    message.encode("utf-8")  # printable on a UTF-8 terminal: no lone surrogates
    assert r"gone \udce9.wav: no such audio file" in message


def test_directory_is_reported_as_a_directory(extractor, tmp_path):
    with pytest.raises(IsADirectoryError, match=r"audio\[0\]: .*: is a directory, not an audio file"):
        extractor([str(tmp_path)])


def test_errors_name_the_batch_index_of_the_bad_file(extractor, tmp_path):
    good = tmp_path / "good.wav"
    good.write_bytes(wav_bytes(tone()))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 20)
    with pytest.raises(ValueError, match=r"audio\[3\]: .*bad\.wav: cannot decode"):
        extractor([str(good), str(good), good, str(bad)])
    with pytest.raises(FileNotFoundError, match=r"audio\[2\]: .*missing\.wav: no such audio file"):
        extractor([str(good), str(good), str(tmp_path / "missing.wav")])
    with pytest.raises(ValueError, match=r"audio\[1\]: cannot decode"):
        extractor([wav_bytes(tone()), b"junk" * 50])


def test_start_skips_the_beginning_of_files_and_arrays(extractor, tmp_path):
    signal = np.concatenate([np.zeros(RATE), tone(1.2)])
    path = tmp_path / "late.wav"
    sf.write(path, signal, RATE, subtype="FLOAT")
    expected = extractor.load_audio(tone(1.2).astype(np.float32), RATE)
    np.testing.assert_array_equal(extractor.load_audio(str(path), start=1.0), expected)
    np.testing.assert_array_equal(extractor.load_audio(signal.astype(np.float32), RATE, start=1.0), expected)
    with pytest.raises(ValueError, match=r"late\.wav: the audio is empty \(0 samples after 5 s\)"):
        extractor.load_audio(str(path), start=5.0)
    with pytest.raises(ValueError, match="start must be a number of seconds >= 0"):
        extractor.load_audio(str(path), start=-1.0)
    # Per input in a batch, as a training item's `audio_start`.
    batch = extractor([str(path), str(path)], start=[1.0, 0.0])["input_features"]
    assert torch.equal(batch[0, :2], extractor([tone(1.2)], sampling_rate=RATE)["input_features"][0])
    assert torch.equal(batch[1], extractor([str(path)])["input_features"][0])
    with pytest.raises(ValueError, match="start: got 1 values for 2 audio inputs"):
        extractor([str(path), str(path)], start=[1.0])


# -- settings ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window_overlap": -1.0}, "window_overlap must be >= 0 seconds, got -1.0"),
        ({"window_length": 0.0}, "window_overlap .* must be smaller than window_length"),
        ({"window_length": -10.0}, "window_overlap .* must be smaller than window_length"),
        ({"window_length": float("nan")}, "window_length must be a finite number, got nan"),
        ({"window_length": 0.01}, r"window_length \(0.01 s\) must hold more than n_fft // 2 = 512 samples"),
        ({"max_num_window": 0}, "max_num_window must be an integer >= 1, got 0"),
        ({"max_num_window": 2.5}, "max_num_window must be an integer >= 1, got 2.5"),
        ({"hop_length": 0}, "hop_length must be an integer >= 1, got 0"),
        ({"n_fft": 0}, "n_fft must be an integer >= 1, got 0"),
        ({"win_length": 2048}, r"win_length \(2048\) must be <= n_fft \(1024\)"),
        ({"feature_size": 0}, "feature_size must be an integer >= 1, got 0"),
        ({"f_max": 9000.0}, "need 0 <= f_min < f_max <= sampling_rate / 2"),
        ({"f_min": -1.0}, "need 0 <= f_min < f_max <= sampling_rate / 2"),
        ({"f_min": 8000.0}, "need 0 <= f_min < f_max <= sampling_rate / 2"),
        ({"sampling_rate": 0}, "sampling_rate must be a positive integer in Hz, got 0"),
        ({"sampling_rate": 10**10}, "sampling_rate is 10000000000 Hz, outside"),
    ],
)
def test_bad_settings_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=rf"AudioFlamingo2FeatureExtractor: {message}"):
        AudioFlamingo2FeatureExtractor(**settings)


def test_bad_settings_in_a_saved_config_are_refused_at_load(tmp_path):
    AudioFlamingo2FeatureExtractor().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="window_overlap must be >= 0 seconds"):
        AudioFlamingo2FeatureExtractor.from_pretrained(tmp_path, window_overlap=-2.0)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["max_num_window"] = -3
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="max_num_window must be an integer >= 1, got -3"):
        AudioFlamingo2FeatureExtractor.from_pretrained(tmp_path)
