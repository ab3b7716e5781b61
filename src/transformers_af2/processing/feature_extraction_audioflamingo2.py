"""Audio front end of Audio Flamingo 2: file or array -> 16 kHz mono -> 10 s windows -> log-mel (frames, 64).

Every step reproduces the original inference code (see the class docstring); torchaudio and librosa are replaced
by `torch.stft` with an HTK mel matrix and by soxr, which compute the same numbers.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.utils import logging

logger = logging.get_logger(__name__)


def htk_mel_filterbank(n_fft: int, n_mels: int, sampling_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, no area normalisation: `(n_fft // 2 + 1, n_mels)` float32."""

    def hz_to_mel(freq):
        return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)

    def mel_to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)

    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    mel_points = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    hz_points = mel_to_hz(mel_points)
    spacing = np.diff(hz_points)
    slopes = hz_points[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / spacing[:-1]
    up = slopes[:, 2:] / spacing[1:]
    return torch.from_numpy(np.maximum(0.0, np.minimum(down, up))).float()


def quantize_int16(waveform: np.ndarray) -> np.ndarray:
    """The original's int16 round trip: clip to [-1, 1], scale, truncate toward zero, scale back (float32)."""
    return (np.clip(waveform, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / np.float32(32767.0)


# Sampling rates the front end accepts, in Hz. Below 1 kHz nothing of the 50-8000 Hz mel range survives; above
# 768 kHz (the highest rate audio interfaces record) a rate is almost certainly a mistake, and soxr's filter
# design for ratios beyond that takes minutes to hours or gives silence.
MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 768_000
# Float32 values per block when reading a file: 4 MiB, whatever the channel count.
_BLOCK_VALUES = 1 << 20


def pydub_mono(pcm: np.ndarray) -> np.ndarray:
    """16-bit PCM values `(frames, channels)` -> mono float32 the way the original read MP3 through pydub:
    channels averaged as `audioop.tomono` does (`floor(0.5 * l + 0.5 * r)`, clamped to int16), then divided by
    32767. One channel is floored the same way (pydub's samples are integers)."""
    mono = np.floor(pcm.mean(axis=1) if pcm.ndim == 2 else pcm)
    return (np.clip(mono, -32768.0, 32767.0) / 32767.0).astype(np.float32)


def check_sampling_rate(rate, name: str, what: str = "sampling_rate") -> int:
    """`rate` as an int when it is a whole number of Hz within `MIN_SAMPLING_RATE..MAX_SAMPLING_RATE`, else a
    `ValueError` naming the input."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name}: {what} must be a positive integer in Hz, got {rate!r}.")
    if not MIN_SAMPLING_RATE <= rate <= MAX_SAMPLING_RATE:
        raise ValueError(
            f"{name}: {what} is {rate} Hz, outside the {MIN_SAMPLING_RATE}..{MAX_SAMPLING_RATE} Hz this front end "
            "accepts; give the rate in Hz (16000 for 16 kHz) or resample the audio first."
        )
    return int(rate)


def _printable(path) -> str:
    """A path as text that can always be printed: bytes that are not valid UTF-8 show as `\\udcXX` escapes."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _checked_path(path, name: str):
    """The path in the form libsndfile opens whatever its encoding (bytes on POSIX), after checking that it is an
    existing regular file."""
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"{name}: no such audio file.")
    if location.is_dir():
        raise IsADirectoryError(f"{name}: is a directory, not an audio file; pass the audio files inside it.")
    if not location.is_file():
        raise ValueError(f"{name}: not a regular file; pass an audio file, its bytes, or an array.")
    # soundfile encodes str paths strictly, which fails for names that are not valid in the file system encoding
    # (undecodable bytes arrive as surrogate escapes); os.fsencode gives back the original bytes.
    return os.fsencode(location) if os.name == "posix" else str(location)


class AudioFlamingo2FeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns audio into AF2's windowed log-mel features.

    Steps, as in the original inference code:
      1. read the file with libsndfile, keeping the **first channel** of multi-channel files (MP3: the **average** of
         the channels, clipped to [-1, 1], as the original's pydub decoding) and only the frames the windows can use
         (`max_num_window` windows), block by block; arrays are taken as given with their `sampling_rate`
         (1 kHz to 768 kHz);
      2. float data with peaks outside [-1, 1] is divided by its peak;
      3. resample to `sampling_rate` (16 kHz) with soxr "HQ";
      4. peak-normalise: `2 * x / max(x) - 1` when the minimum is >= 0, else `x / max(|x|)`;
      5. split into windows of `window_length` seconds (stride `window_length - window_overlap`), zero-padding the
         last, at most `max_num_window`; quantise through int16 (truncating) and back;
      6. log-mel of each window: periodic Hann STFT (`n_fft`, `hop_length`, centred, reflect padding), power 2,
         HTK mel filters without normalisation, `10 * log10(max(mel, 1e-10))`.

    Silent (constant) input: the original divides by zero and its int16 cast turns the NaNs into zeros, so a
    silent input gives all-zero windows here too (never NaN), with a warning. NaN or infinite samples are an error.

    Returns `input_features` `(batch, windows, frames, feature_size)` float32 and `input_features_mask`
    `(batch, windows)`; windows past a sample's own count are padding (mask 0, features of silence).
    """

    model_input_names = ["input_features", "input_features_mask"]

    def __init__(
        self,
        feature_size: int = 64,
        sampling_rate: int = 16000,
        window_length: float = 10.0,
        window_overlap: float = 0.0,
        max_num_window: int = 12,
        n_fft: int = 1024,
        win_length: int = 1024,
        hop_length: int = 160,
        f_min: float = 50.0,
        f_max: float = 8000.0,
        padding_value: float = 0.0,
        return_attention_mask: bool = False,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.window_length = window_length
        self.window_overlap = window_overlap
        self.max_num_window = max_num_window
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.f_min = f_min
        self.f_max = f_max
        self._validate_config()
        self.window_length, self.window_overlap = float(window_length), float(window_overlap)
        self.f_min, self.f_max = float(f_min), float(f_max)

    def _validate_config(self) -> None:
        """Every setting checked at construction (and so at `from_pretrained`), with the value and the rule."""

        def number(value) -> bool:
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

        def whole(key: str, minimum: int) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ValueError(f"{type(self).__name__}: {key} must be an integer >= {minimum}, got {value!r}.")

        for key in ("feature_size", "max_num_window", "n_fft", "win_length", "hop_length"):
            whole(key, 1)
        check_sampling_rate(self.sampling_rate, type(self).__name__)
        name = type(self).__name__
        for key in ("window_length", "window_overlap", "f_min", "f_max"):
            value = getattr(self, key)
            if not number(value) or not math.isfinite(value):
                raise ValueError(f"{name}: {key} must be a finite number, got {value!r}.")
        if self.win_length > self.n_fft:
            raise ValueError(f"{name}: win_length ({self.win_length}) must be <= n_fft ({self.n_fft}).")
        if self.window_overlap < 0:
            raise ValueError(f"{name}: window_overlap must be >= 0 seconds, got {self.window_overlap!r}.")
        if self.window_overlap >= self.window_length:
            raise ValueError(
                f"{name}: window_overlap ({self.window_overlap}) must be smaller than window_length "
                f"({self.window_length})."
            )
        if int(self.window_length * self.sampling_rate) <= self.n_fft // 2:
            # The centred STFT reflects n_fft // 2 samples at each edge, which needs a longer window.
            raise ValueError(
                f"{name}: window_length ({self.window_length} s) must hold more than n_fft // 2 = {self.n_fft // 2} "
                f"samples at {self.sampling_rate} Hz."
            )
        if int(self.window_length * self.sampling_rate) - int(self.window_overlap * self.sampling_rate) < 1:
            raise ValueError(f"{name}: window_length - window_overlap must be at least one sample.")
        if not 0 <= self.f_min < self.f_max <= self.sampling_rate / 2:
            raise ValueError(
                f"{name}: need 0 <= f_min < f_max <= sampling_rate / 2; got f_min={self.f_min}, f_max={self.f_max}, "
                f"sampling_rate={self.sampling_rate}."
            )

    # -- sizes -------------------------------------------------------------------------------------------------
    @property
    def window_samples(self) -> int:
        """Samples per window at `sampling_rate` (160 000 for 10 s at 16 kHz)."""
        return int(self.window_length * self.sampling_rate)

    @property
    def stride_samples(self) -> int:
        """Distance between window starts: window minus overlap, in samples."""
        return self.window_samples - int(self.window_overlap * self.sampling_rate)

    @property
    def max_samples(self) -> int:
        """Samples covered by `max_num_window` windows; anything later is never used."""
        return self.window_samples + (self.max_num_window - 1) * self.stride_samples

    # -- step 1-4 ----------------------------------------------------------------------------------------------
    def load_audio(
        self, audio, sampling_rate: int | None = None, name: str = "audio", start: float = 0.0
    ) -> np.ndarray:
        """One audio input -> peak-normalised float64 waveform at `self.sampling_rate`, cut to the duration the
        windows can hold (with a warning saying how much was dropped).

        Accepted: a path; `bytes` or a binary file-like object holding an encoded file; a float array or tensor
        (1-D, or 2-D with up to 8 channels on either axis: the first channel is kept, as for files) with
        `sampling_rate`; a `datasets` Audio dict (`{"array", "sampling_rate"}`, `{"path"}` or `{"bytes"}`).
        `start` (seconds) skips the beginning, as the original's `audio_start` does. `name` labels the input in
        error messages (`audio[i]` for the i-th input of a batch).

        Files are read in blocks, one channel kept, so memory grows with the seconds used, not with the channel
        count or the length of the file.
        """
        if isinstance(audio, dict):
            if audio.get("array") is not None:
                return self.load_audio(audio["array"], audio.get("sampling_rate", sampling_rate), name, start)
            if audio.get("bytes") is not None:
                label = name if audio.get("path") is None else f"{name}: {_printable(audio['path'])}"
                return self.load_audio(audio["bytes"], None, label, start)
            if audio.get("path") is not None:
                return self.load_audio(audio["path"], None, name, start)
            raise ValueError(f"{name}: an audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'.")
        if not (isinstance(start, (int, float, np.integer, np.floating)) and math.isfinite(start) and start >= 0):
            raise ValueError(f"{name}: start must be a number of seconds >= 0, got {start!r}.")
        mp3 = False
        if isinstance(audio, (str, os.PathLike, bytes, bytearray)) or hasattr(audio, "read"):
            if isinstance(audio, (str, os.PathLike)):
                name = f"{name}: {_printable(audio)}"
                source = _checked_path(audio, name)
            else:
                source = io.BytesIO(audio) if isinstance(audio, (bytes, bytearray)) else audio
            data, peak, source_rate, total_frames, mp3 = self._read_file(source, name, start)
        else:
            if sampling_rate is None:
                raise ValueError(f"{name}: sampling_rate is required with array input (pass sampling_rate=... in Hz).")
            source_rate = check_sampling_rate(sampling_rate, name)
            data, total_frames = self._first_channel(audio, name, start, source_rate)
            peak = np.abs(data).max() if data.size else 0.0
        if data.size == 0:
            raise ValueError(f"{name}: the audio is empty (0 samples" + (f" after {start:g} s)." if start else ")."))
        if not np.isfinite(peak):
            raise ValueError(f"{name}: the audio contains NaN or infinite samples; clean or replace them first.")
        dropped = (total_frames - len(data)) / source_rate
        if dropped > 0:
            logger.warning(
                f"{name}: audio is {total_frames / source_rate:.1f} s, longer than the {self.max_num_window} windows "
                f"of {self.window_length:g} s this model reads; the last {dropped:.1f} s are dropped "
                "(raise max_num_window to read more)."
            )
        # Samples outside [-1, 1] are divided by the peak (over all channels for files), as the original did before
        # keeping the first channel; the division is linear, so doing it on the kept channel gives the same numbers.
        # MP3 PCM is int16-valued and was never divided.
        if peak > 1.0 and not mp3:
            data = data / data.dtype.type(peak)
        if source_rate != self.sampling_rate:
            resampled = soxr.resample(data, source_rate, self.sampling_rate, quality="HQ")
            # librosa.resample (the original's call) pads or trims soxr's output to ceil(n * ratio) samples.
            target_length = int(np.ceil(len(data) * self.sampling_rate / source_rate))
            padding = [(0, max(0, target_length - len(resampled)))] + [(0, 0)] * (resampled.ndim - 1)
            data = np.pad(resampled, padding)[:target_length]
        if mp3:
            data = pydub_mono(data)
        return self._peak_normalise(data.astype(np.float64, copy=False), name)

    def _frames_needed(self, rate: int) -> int:
        # The original reads int(duration * rate) frames of the source, with the duration in seconds computed as
        # below, and resamples only those.
        duration = self.max_num_window * (self.window_length - self.window_overlap) + self.window_overlap
        return int(duration * rate)

    def _read_file(self, source, name: str, start: float = 0.0) -> tuple[np.ndarray, float, int, int, bool]:
        """Reads the frames the windows can use, block by block, keeping only what the original used.

        Returns `(samples, peak, rate, frames, mp3)`. `samples` is float32: the first channel `(n,)`; or, for MP3
        (`mp3` True), every channel `(n, channels)` as 16-bit PCM values, the way the original's pydub decoding
        saw them (ffmpeg rounds to int16), to be resampled and mixed down by `pydub_mono`. `peak` is the largest
        magnitude over all channels read (NaN if any sample is NaN); `frames` the length of the file from `start`.
        """
        try:
            with sf.SoundFile(source) as handle:
                rate, channels = handle.samplerate, handle.channels
                check_sampling_rate(rate, name, what="the file's sampling rate")
                first = min(int(start * rate), handle.frames)
                if first:
                    handle.seek(first)
                total = handle.frames - first
                wanted = min(total, self._frames_needed(rate))
                mp3 = handle.format == "MP3"
                samples = np.empty((wanted, channels) if mp3 else wanted, dtype=np.float32)
                block = np.empty((max(1, min(wanted, _BLOCK_VALUES // channels)), channels), dtype=np.float32)
                peak, filled = np.float32(0.0), 0
                while filled < wanted:
                    chunk = handle.read(out=block[: min(len(block), wanted - filled)])
                    if len(chunk) == 0:
                        break
                    peak = np.maximum(peak, np.abs(chunk).max())  # np.maximum keeps a NaN
                    if mp3:
                        np.clip(np.rint(chunk * 32768.0), -32768.0, 32767.0, out=samples[filled : filled + len(chunk)])
                    else:
                        samples[filled : filled + len(chunk)] = chunk[:, 0]
                    filled += len(chunk)
        except (sf.LibsndfileError, RuntimeError, TypeError) as error:
            raise ValueError(
                f"{name}: cannot decode this audio ({error}); use WAV, FLAC, OGG/Vorbis or MP3, or pass an array."
            ) from error
        return samples[:filled], float(peak), rate, total, mp3

    def _first_channel(self, audio, name: str, start: float, rate: int) -> tuple[np.ndarray, int]:
        """An array input -> its first channel from `start`, only the frames the windows can use, as float64; and
        the number of frames from `start` on."""
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu()
            audio = audio.float().numpy() if audio.dtype == torch.bfloat16 else audio.numpy()
        array = np.asarray(audio)
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(
                f"{name}: expected float samples in [-1, 1], got dtype {array.dtype}; convert integer PCM with "
                "x / 32768 (int16) or pass the file itself."
            )
        if array.ndim == 2 and min(array.shape) <= 8 and max(array.shape) > 8:
            # Multi-channel: keep the first channel, as AF2 does for files, whichever axis holds the channels.
            array = array[0] if array.shape[0] < array.shape[1] else array[:, 0]
        if array.ndim != 1:
            raise ValueError(
                f"{name}: expected a 1-D mono waveform (or 2-D with at most 8 channels), got shape {array.shape}."
            )
        first = min(int(start * rate), len(array))
        used = array[first : first + self._frames_needed(rate)]
        return used.astype(np.float64), len(array) - first

    @staticmethod
    def _peak_normalise(data: np.ndarray, name: str) -> np.ndarray:
        if data.min() >= 0:
            scale = np.abs(data.max())
            if scale == 0:
                logger.warning(f"{name}: the audio is silent; it is encoded as silence.")
                return np.zeros_like(data)
            return 2.0 * data / scale - 1.0
        return data / max(abs(data.max()), abs(data.min()))

    # -- step 5 ------------------------------------------------------------------------------------------------
    def num_windows(self, num_samples: int) -> int:
        """Windows for `num_samples` samples at `sampling_rate`: 1 up to one window, `max_num_window` from
        `max_samples` on, else `1 + ceil((num_samples - window) / stride)` (the last one zero-padded)."""
        window, stride = self.window_samples, self.stride_samples
        if num_samples <= window:
            return 1
        if num_samples >= self.max_samples:
            return self.max_num_window
        return 1 + math.ceil((num_samples - window) / stride)

    def split_windows(self, waveform: np.ndarray) -> np.ndarray:
        """Normalised waveform `(samples,)` -> `(windows, window_samples)` float32 after the int16 round trip.

        The waveform is zero-padded to `window_samples + (windows - 1) * stride_samples` (anything longer is cut)
        and the windows start every `stride_samples`. Every returned window is a real one (mask 1).
        """
        count = self.num_windows(len(waveform))
        full_length = self.window_samples + (count - 1) * self.stride_samples
        padded = np.zeros(full_length, dtype=np.float64)
        usable = min(len(waveform), full_length)
        padded[:usable] = waveform[:usable]
        quantized = quantize_int16(padded)
        starts = np.arange(count) * self.stride_samples
        windows = np.stack([quantized[s : s + self.window_samples] for s in starts])
        # The original's CLAP wrapper quantises each window once more; idempotent, kept for identical numbers.
        return quantize_int16(windows)

    # -- step 6 ------------------------------------------------------------------------------------------------
    def log_mel(self, windows: torch.Tensor) -> torch.Tensor:
        """`(n, samples)` -> `(n, frames, feature_size)` log-mel in dB, batched over all windows."""
        window_fn = torch.hann_window(self.win_length, periodic=True, dtype=torch.float32, device=windows.device)
        spectrum = torch.stft(
            windows.float(),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=window_fn,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        power = spectrum.real.square() + spectrum.imag.square()  # (n, freq, frames)
        filters = htk_mel_filterbank(self.n_fft, self.feature_size, self.sampling_rate, self.f_min, self.f_max)
        mel = torch.matmul(power.transpose(1, 2), filters.to(power.device))
        return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))

    def fetch_audio(self, audio, sampling_rate: int | None = None):
        """Returns paths, bytes and arrays unchanged: `__call__` reads them itself with AF2's semantics (first
        channel, soxr resampling). transformers' default would decode files here and average the channels."""
        return audio

    # -- batch -------------------------------------------------------------------------------------------------
    def __call__(
        self,
        audio,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        start: float | list[float] = 0.0,
        **kwargs,
    ):
        """
        Args:
            audio: one input (see `load_audio`) or a list of them.
            sampling_rate: rate of array inputs in Hz.
            start: seconds to skip at the beginning of every input, or a list with one value per input (the
                original's `audio_start` of a training item).
        Returns:
            `BatchFeature` with `input_features` (batch, windows, frames, feature_size) and `input_features_mask`.
        """
        items = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        if not items:
            raise ValueError("audio: got an empty list; pass at least one file or array.")
        starts = list(start) if isinstance(start, (list, tuple)) else [start] * len(items)
        if len(starts) != len(items):
            raise ValueError(f"start: got {len(starts)} values for {len(items)} audio inputs; pass one per input.")
        per_sample = [
            self.split_windows(self.load_audio(item, sampling_rate, name=f"audio[{index}]", start=offset))
            for index, (item, offset) in enumerate(zip(items, starts))
        ]
        counts = [len(windows) for windows in per_sample]
        all_windows = torch.from_numpy(np.concatenate(per_sample))
        mel = self.log_mel(all_windows)
        widest = max(counts)
        features = self.log_mel(torch.zeros(1, self.window_samples)).expand(len(items), widest, -1, -1).clone()
        mask = torch.zeros(len(items), widest, dtype=torch.long)
        offset = 0
        for row, count in enumerate(counts):
            features[row, :count] = mel[offset : offset + count]
            mask[row, :count] = 1
            offset += count
        data = {"input_features": features, "input_features_mask": mask}
        if return_tensors == "np":
            data = {k: v.numpy() for k, v in data.items()}
        elif return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        return BatchFeature(data=data)


__all__ = ["AudioFlamingo2FeatureExtractor", "htk_mel_filterbank", "quantize_int16"]
