"""AudioFlamingo2FeatureExtractor: parity with the original front end on the shared fixtures, plus invariants.

Parity (tolerances from ../shared/parity/README.md): the waveform windows within 1e-4, the log-mel within 0.02 dB
(the reference mel came from torchaudio's float32 filter bank). The invariant tests write their own WAV files.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers.testing_utils import CaptureLogger

from transformers_af2 import AudioFlamingo2FeatureExtractor
from transformers_af2.processing import feature_extraction_audioflamingo2 as fe_module

PARITY_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "parity"
FIXTURE_DIRS = sorted(p for p in PARITY_ROOT.glob("fixture_*") if (p / "reference.json").is_file())
CLIPS_TOLERANCE = 1e-4
MEL_TOLERANCE_DB = 0.02
SILENCE_DB = -100.0  # 10 * log10(1e-10): the log-mel of an all-zero window, also used for padded windows
RATE = 16000


def _fixture_params():
    if not FIXTURE_DIRS:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no parity fixture under {PARITY_ROOT}"))]
    return [pytest.param(path, id=path.name) for path in FIXTURE_DIRS]


class Fixture:
    def __init__(self, directory: Path):
        self.directory = directory
        self.reference = json.loads((directory / "reference.json").read_text())
        self.tensors = load_file(directory / "reference.safetensors")
        clap = self.reference["clap_config"]
        self.extractor = AudioFlamingo2FeatureExtractor(
            window_length=clap["window_length"],
            window_overlap=clap["window_overlap"],
            max_num_window=clap["max_num_window"],
        )

    @property
    def wavs(self) -> list[Path]:
        # reference.json names the files either bare or relative to the fixture ("audio/clip.wav").
        return [
            self.directory / name if (self.directory / name).is_file() else self.directory / "audio" / name
            for name in self.reference["audio_files"]
        ]

    def samples(self):
        """(index, key prefix, wav path) for every sample of the fixture."""
        return [(index, f"s{index}", path) for index, path in enumerate(self.wavs)]


@pytest.fixture(scope="module", params=_fixture_params())
def fixture(request):
    return Fixture(request.param)


def _max_diff(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Parity with the original front end
# ---------------------------------------------------------------------------------------------------------------


def test_split_windows_of_the_wav_match_the_reference_clips(fixture):
    for _, key, wav in fixture.samples():
        clips = fixture.extractor.split_windows(fixture.extractor.load_audio(wav))
        expected = fixture.tensors[f"{key}.audio_clips"]
        assert clips.dtype == np.float32
        assert clips.shape == tuple(expected.shape), key
        diff = _max_diff(clips, expected)
        assert diff <= CLIPS_TOLERANCE, f"{key}: audio_clips max abs diff {diff}"


def test_log_mel_of_the_reference_clips_matches_the_reference_mel(fixture):
    for _, key, _ in fixture.samples():
        mel = fixture.extractor.log_mel(fixture.tensors[f"{key}.audio_clips"])
        expected = fixture.tensors[f"{key}.mel"]
        assert mel.dtype == torch.float32
        assert mel.shape == expected.shape, key
        diff = _max_diff(mel, expected)
        assert diff <= MEL_TOLERANCE_DB, f"{key}: mel max abs diff {diff} dB"


def test_batch_call_matches_reference_mel_and_mask(fixture):
    samples = fixture.samples()
    out = fixture.extractor([wav for _, _, wav in samples], return_tensors="pt")
    features, mask = out["input_features"], out["input_features_mask"]
    counts = [fixture.tensors[f"{key}.audio_clips"].shape[0] for _, key, _ in samples]
    widest = max(counts)
    assert features.dtype == torch.float32 and mask.dtype == torch.int64
    assert features.shape == (len(samples), widest, 1001, fixture.extractor.feature_size)
    assert mask.shape == (len(samples), widest)
    for row, (_, key, _) in enumerate(samples):
        count = counts[row]
        assert count == fixture.reference[f"{key}.num_windows"]
        expected_mask = torch.zeros(widest, dtype=torch.int64)
        expected_mask[:count] = fixture.tensors[f"{key}.audio_mask"].long()
        assert torch.equal(mask[row], expected_mask), key
        diff = _max_diff(features[row, :count], fixture.tensors[f"{key}.mel"])
        assert diff <= MEL_TOLERANCE_DB, f"{key}: input_features max abs diff {diff} dB"
        # Padded windows hold the log-mel of silence (documented), exactly -100 dB.
        assert torch.equal(features[row, count:], torch.full_like(features[row, count:], SILENCE_DB))
    if "batch.audio_mask" in fixture.tensors:
        assert torch.equal(mask, fixture.tensors["batch.audio_mask"].long())


# ---------------------------------------------------------------------------------------------------------------
# Invariants on audio the tests make themselves
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_extractor():
    return AudioFlamingo2FeatureExtractor()


@pytest.fixture(scope="module")
def small_extractor():
    # 1 s windows, at most 3: the same rules as the released 10 s x 12, faster.
    return AudioFlamingo2FeatureExtractor(window_length=1.0, max_num_window=3)


def _tone(seconds, rate, freq=440.0, amplitude=0.5):
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def test_default_config_shapes_and_names(default_extractor):
    assert default_extractor.model_input_names == ["input_features", "input_features_mask"]
    assert default_extractor.window_samples == 160000
    assert default_extractor.stride_samples == 160000
    assert default_extractor.max_samples == 1920000
    out = default_extractor(_tone(3.0, RATE), sampling_rate=RATE)
    assert out["input_features"].shape == (1, 1, 1001, 64)
    assert out["input_features_mask"].tolist() == [[1]]


def test_44k_file_is_resampled_to_16k(default_extractor, tmp_path):
    seconds, rate = 23.0, 44100
    path = tmp_path / "tone44k.wav"
    sf.write(path, _tone(seconds, rate), rate, subtype="FLOAT")
    waveform = default_extractor.load_audio(path)
    # librosa's length rule after soxr: ceil(n * 16000 / 44100).
    assert len(waveform) == math.ceil(int(seconds * rate) * RATE / rate) == 368000
    # Away from the edges the resampled tone equals the tone made at 16 kHz (peak-normalised to 1).
    reference = _tone(seconds, RATE)
    reference = reference / np.abs(reference).max()
    middle = slice(1000, len(waveform) - 1000)
    assert np.abs(waveform[middle] - reference[middle]).max() < 1e-3
    out = default_extractor([path])
    assert out["input_features_mask"].tolist() == [[1, 1, 1]]  # 23 s -> 3 windows of 10 s
    assert out["input_features"].shape == (1, 3, 1001, 64)


def test_two_channel_file_uses_the_first_channel(small_extractor, tmp_path):
    first = _tone(1.5, RATE, freq=440.0, amplitude=0.5)
    second = _tone(1.5, RATE, freq=3000.0, amplitude=0.9)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([first, second], axis=1), RATE, subtype="FLOAT")
    got = small_extractor.split_windows(small_extractor.load_audio(path))
    expected = small_extractor.split_windows(small_extractor.load_audio(first.astype(np.float32), RATE))
    np.testing.assert_array_equal(got, expected)
    mean = small_extractor.split_windows(small_extractor.load_audio((first + second) / 2, RATE))
    assert np.abs(got - mean).max() > 0.1  # not the channel average


def test_float_wav_with_peaks_above_one_is_divided_by_its_peak(small_extractor, tmp_path):
    signal = _tone(1.0, RATE, amplitude=3.0)
    signal[123] = -6.0
    path = tmp_path / "loud.wav"
    sf.write(path, signal, RATE, subtype="FLOAT")
    waveform = small_extractor.load_audio(path)
    np.testing.assert_allclose(waveform, signal.astype(np.float32) / 6.0, atol=1e-7)
    assert waveform.min() == pytest.approx(-1.0) and waveform.max() == pytest.approx(0.5, abs=1e-6)


def test_peak_normalisation_rules(small_extractor):
    non_negative = np.array([0.0, 0.1, 0.25, 0.5] * 100)
    np.testing.assert_allclose(small_extractor.load_audio(non_negative, RATE), 2 * non_negative / 0.5 - 1)
    signed = np.array([-0.2, 0.1, 0.4] * 100)
    np.testing.assert_allclose(small_extractor.load_audio(signed, RATE), signed / 0.4)


def test_int16_round_trip_truncates_toward_zero(small_extractor):
    values = np.array([1000.7, -1000.7, 32766.9, 40000.0, -40000.0]) / 32767
    window = small_extractor.split_windows(values)[0, : len(values)]
    expected = np.array([1000, -1000, 32766, 32767, -32767], dtype=np.float32) / np.float32(32767)
    np.testing.assert_array_equal(window, expected)
    assert not np.any(small_extractor.split_windows(values)[0, len(values) :])  # zero padding


@pytest.mark.parametrize(
    ("samples", "expected"),
    [(1, 1), (16000, 1), (16001, 2), (28000, 2), (28001, 3), (40000, 3), (40001, 4), (52000, 4), (10**6, 4)],
)
def test_window_count_and_stride_with_overlap(samples, expected):
    """1 s windows, 0.25 s overlap, at most 4: W = 16000, stride 12000, M*W - (M-1)*overlap = 52000 samples.

    Rule: 1 if T <= W, M if T >= 52000, else 1 + ceil((T - W) / stride); windows are zero-padded, not repeated.
    """
    extractor = AudioFlamingo2FeatureExtractor(window_length=1.0, window_overlap=0.25, max_num_window=4)
    window, stride = 16000, 12000
    assert extractor.window_samples == window and extractor.stride_samples == stride
    assert extractor.max_samples == 52000
    assert extractor.num_windows(samples) == expected
    waveform = np.linspace(-1.0, 1.0, samples) if samples > 1 else np.array([0.5])
    windows = extractor.split_windows(waveform)
    assert windows.shape == (expected, window) and windows.dtype == np.float32
    padded = np.zeros(window + (expected - 1) * stride)
    usable = min(samples, len(padded))
    padded[:usable] = waveform[:usable]
    quantized = (np.clip(padded, -1, 1) * 32767).astype(np.int16).astype(np.float32) / np.float32(32767)
    for index in range(expected):
        np.testing.assert_array_equal(windows[index], quantized[index * stride : index * stride + window])


def test_silent_input_gives_finite_silence_with_a_warning(small_extractor, tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(RATE * 2), RATE, subtype="PCM_16")
    with CaptureLogger(fe_module.logger) as captured:
        out = small_extractor([path, np.zeros(500, dtype=np.float32)], sampling_rate=RATE)
    assert "silent" in captured.out
    features = out["input_features"]
    assert torch.isfinite(features).all()
    assert torch.equal(features, torch.full_like(features, SILENCE_DB))
    assert out["input_features_mask"].tolist() == [[1, 1], [1, 0]]
    assert not np.any(small_extractor.load_audio(np.zeros(100), RATE))


def test_constant_input_is_finite():
    extractor = AudioFlamingo2FeatureExtractor(window_length=1.0, max_num_window=2)
    np.testing.assert_array_equal(extractor.load_audio(np.full(300, 0.3), RATE), np.ones(300))  # 2*x/max - 1
    np.testing.assert_array_equal(extractor.load_audio(np.full(300, -0.3), RATE), -np.ones(300))  # x / max|x|
    assert torch.isfinite(extractor(np.full(300, -0.3), sampling_rate=RATE)["input_features"]).all()


def test_nan_or_inf_samples_raise_naming_the_input(small_extractor):
    good = _tone(0.5, RATE)
    bad = good.copy()
    bad[10] = np.nan
    with pytest.raises(ValueError, match=r"audio\[1\]: .*NaN or infinite"):
        small_extractor([good, bad], sampling_rate=RATE)
    bad[10] = -np.inf
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        small_extractor(bad, sampling_rate=RATE)


def test_long_audio_is_truncated_with_a_warning(small_extractor, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _tone(5.0, 8000), 8000, subtype="PCM_16")
    with CaptureLogger(fe_module.logger) as captured:
        waveform = small_extractor.load_audio(path)
        out = small_extractor([path])
    assert "long.wav" in captured.out and "the last 2.0 s are dropped" in captured.out
    assert len(waveform) == small_extractor.max_samples == 3 * RATE
    assert out["input_features_mask"].tolist() == [[1, 1, 1]]
    # The kept part is the start of the file, resampled.
    head = tmp_path / "head.wav"
    sf.write(head, _tone(3.0, 8000), 8000, subtype="PCM_16")
    with CaptureLogger(fe_module.logger) as captured:
        np.testing.assert_array_equal(small_extractor.load_audio(head), waveform)
    assert "dropped" not in captured.out


def test_array_input_needs_sampling_rate(small_extractor):
    with pytest.raises(ValueError, match="sampling_rate"):
        small_extractor(_tone(0.5, RATE))
    with pytest.raises(ValueError, match="sampling_rate"):
        small_extractor.load_audio(torch.zeros(100))


def test_integer_arrays_and_wide_2d_arrays_are_rejected(small_extractor):
    with pytest.raises(TypeError, match=r"float samples in \[-1, 1\].*int16"):
        small_extractor(np.zeros(100, dtype=np.int16), sampling_rate=RATE)
    with pytest.raises(ValueError, match="1-D mono"):
        small_extractor(np.zeros((20, 30)), sampling_rate=RATE)


def test_tensor_and_array_inputs_agree_and_numpy_output(small_extractor):
    signal = _tone(1.3, 22050).astype(np.float32)
    from_array = small_extractor(signal, sampling_rate=22050)
    from_tensor = small_extractor([torch.from_numpy(signal)], sampling_rate=22050)
    assert torch.equal(from_array["input_features"], from_tensor["input_features"])
    as_numpy = small_extractor(signal, sampling_rate=22050, return_tensors="np")
    assert isinstance(as_numpy["input_features"], np.ndarray) and as_numpy["input_features"].dtype == np.float32
    np.testing.assert_array_equal(as_numpy["input_features"], from_array["input_features"].numpy())
    assert as_numpy["input_features_mask"].dtype == np.int64


def test_log_mel_is_batched_per_window(small_extractor):
    generator = torch.Generator().manual_seed(0)
    windows = torch.rand(3, small_extractor.window_samples, generator=generator) * 2 - 1
    batched = small_extractor.log_mel(windows)
    assert batched.shape == (3, 101, 64)
    for index in range(3):
        single = small_extractor.log_mel(windows[index : index + 1])[0]
        assert _max_diff(batched[index], single) < 1e-4
    # A 1 kHz tone puts its energy in the mel bin holding 1 kHz (HTK scale, 50-8000 Hz, 64 bins).
    tone = torch.from_numpy(_tone(1.0, RATE, freq=1000.0).astype(np.float32))[None]
    loudest = small_extractor.log_mel(tone)[0, 50].argmax().item()

    def hz_to_mel(freq):
        return 2595 * math.log10(1 + freq / 700)

    centres = np.linspace(hz_to_mel(50.0), hz_to_mel(8000.0), 66)[1:-1]
    assert loudest == int(np.abs(centres - hz_to_mel(1000.0)).argmin())


def test_save_and_load_round_trip_keeps_every_field(tmp_path):
    extractor = AudioFlamingo2FeatureExtractor(
        feature_size=80,
        sampling_rate=24000,
        window_length=5.0,
        window_overlap=1.0,
        max_num_window=7,
        n_fft=512,
        win_length=400,
        hop_length=120,
        f_min=20.0,
        f_max=11000.0,
        padding_value=0.5,
        return_attention_mask=True,
    )
    extractor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    loaded = AudioFlamingo2FeatureExtractor.from_pretrained(tmp_path)
    expected = {
        "feature_size": 80,
        "sampling_rate": 24000,
        "window_length": 5.0,
        "window_overlap": 1.0,
        "max_num_window": 7,
        "n_fft": 512,
        "win_length": 400,
        "hop_length": 120,
        "f_min": 20.0,
        "f_max": 11000.0,
        "padding_value": 0.5,
        "return_attention_mask": True,
    }
    for name, value in expected.items():
        assert saved[name] == value, name
        assert getattr(loaded, name) == value, name
    assert loaded.to_dict() == extractor.to_dict()
    signal = _tone(6.0, 24000)
    a = extractor(signal, sampling_rate=24000)
    b = loaded(signal, sampling_rate=24000)
    assert torch.equal(a["input_features"], b["input_features"])
    # 6 s with 5 s windows and 1 s overlap: 2 windows of 120000 samples, (120000 / 120 + 1) frames of 80 bins.
    assert a["input_features"].shape == (1, 2, 1001, 80)
