"""Training data for Audio Flamingo 2: the original's dataset JSON, JSONL manifests and `datasets` datasets.

Every reader returns a `datasets.Dataset` with one row per example and the columns

- `audio`: a file path (str), or for `datasets` sources an Audio dict (`{"bytes", "path"}` or `{"array",
  "sampling_rate"}`), never decoded here: the collator reads it, in the data loader workers;
- `prompt`, `answer` (str); `audio_start` (float seconds, 0 unless the source gives one);
- `num_windows`: how many 10 s windows the audio gives (from the file header, no decoding);
- `length`: the sort key for length-grouped batching, `num_windows * 4096 + min(len(prompt) + len(answer), 4095)`:
  similar window counts first, similar text lengths second. It is the `length_column_name` that the Trainer's
  `train_sampling_strategy="group_by_length"` reads.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from .collator import max_frames

logger = logging.get_logger(__name__)

LENGTH_TEXT_SLOTS = 4096


def _feature_extractor(feature_extractor=None):
    if feature_extractor is not None:
        return feature_extractor
    from ..processing import AudioFlamingo2FeatureExtractor

    return AudioFlamingo2FeatureExtractor()


def audio_duration(audio: Any, audio_start: float = 0.0) -> tuple[int, int]:
    """`(frames, sampling_rate)` of the audio after `audio_start`, read from the file header (no decoding)."""
    import soundfile as sf

    if hasattr(audio, "metadata") and hasattr(audio, "get_all_samples"):  # torchcodec AudioDecoder
        rate = int(audio.metadata.sample_rate)
        frames = round(float(audio.metadata.duration_seconds_from_header or 0.0) * rate)
    elif isinstance(audio, Mapping) and audio.get("array") is not None:
        rate = int(audio["sampling_rate"])
        array = np.asarray(audio["array"])
        frames = array.shape[-1] if array.ndim == 2 and array.shape[0] <= 8 else array.shape[0]
    else:
        source = audio
        if isinstance(audio, Mapping):
            source = io.BytesIO(audio["bytes"]) if audio.get("bytes") is not None else audio.get("path")
        elif isinstance(audio, (bytes, bytearray)):
            source = io.BytesIO(audio)
        info = sf.info(source)
        rate, frames = int(info.samplerate), int(info.frames)
    return max(0, frames - int(float(audio_start or 0.0) * rate)), rate


def count_windows(audio: Any, feature_extractor=None, audio_start: float = 0.0) -> int:
    """The number of windows the feature extractor will make of this audio (1 when the header cannot be read: the
    collator reports the error when the audio is used)."""
    extractor = _feature_extractor(feature_extractor)
    try:
        frames, rate = audio_duration(audio, audio_start)
    except Exception as error:  # noqa: BLE001 - any unreadable header counts as one window; decoding raises later
        logger.warning(f"cannot read the length of {_describe(audio)} ({error}); counting it as 1 window.")
        return 1
    frames = min(frames, max_frames(extractor, rate))
    samples = math.ceil(frames * extractor.sampling_rate / rate) if rate != extractor.sampling_rate else frames
    return extractor.num_windows(samples)


def _describe(audio: Any) -> str:
    if isinstance(audio, Mapping):
        return str(audio.get("path") or "an in-memory audio")
    return str(audio) if isinstance(audio, (str, os.PathLike)) else type(audio).__name__


def length_key(num_windows: int, prompt: Any, answer: Any) -> int:
    """`num_windows * 4096 + min(characters of prompt and answer, 4095)`."""
    text = len(str(prompt)) + len(str(answer))
    return int(num_windows) * LENGTH_TEXT_SLOTS + min(text, LENGTH_TEXT_SLOTS - 1)


def _add_lengths(dataset, feature_extractor=None, num_proc: int | None = None, audio_column: str = "audio"):
    extractor = _feature_extractor(feature_extractor)

    def add(example):
        windows = count_windows(example[audio_column], extractor, example.get("audio_start") or 0.0)
        return {"num_windows": windows, "length": length_key(windows, example["prompt"], example["answer"])}

    return dataset.map(add, num_proc=num_proc, desc="counting audio windows")


def _resolve_path(name: str, data_root: str | os.PathLike | None, base: Path) -> str:
    path = Path(os.path.expanduser(str(name)))
    if not path.is_absolute():
        path = Path(data_root) / path if data_root is not None else base / path
    return str(path)


def load_af2_json(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    feature_extractor=None,
    compute_lengths: bool = True,
    num_proc: int | None = None,
):
    """
    Reads a dataset file in the original AF2 format:

        {"split_path": "<folder>" (optional), "flamingo_task": ..., "total_num": N,
         "data": {"0": {"name": "<rel path>", "prompt": ..., "output": ..., "audio_start": <s> (optional)}, ...}}

    A relative `name` is joined to `split_path`, then to `data_root` (the original's `os.path.join(data_root,
    split_path, name)`; an absolute one is kept); without `data_root`, relative paths are taken from the JSON file's
    folder. `output` becomes the `answer` column.
    """
    import datasets

    path = Path(path)
    contents = json.loads(path.read_text())
    if not isinstance(contents, Mapping) or not isinstance(contents.get("data"), (Mapping, list)):
        raise ValueError(f"{path}: not an AF2 dataset file (expected an object with a 'data' mapping).")
    items = contents["data"]
    items = [items[key] for key in sorted(items, key=_index_key)] if isinstance(items, Mapping) else list(items)
    split_path = contents.get("split_path")
    rows = {"audio": [], "prompt": [], "answer": [], "audio_start": []}
    for index, item in enumerate(items):
        name = item.get("name")
        if not isinstance(name, str):
            raise ValueError(
                f"{path}: item {index} has name {name!r}; only a single audio path per item is supported "
                "(as in the original)."
            )
        if split_path:
            name = os.path.join(split_path, name)
        rows["audio"].append(_resolve_path(name, data_root, path.parent))
        rows["prompt"].append(str(item.get("prompt", "")))
        rows["answer"].append(str(item.get("output", item.get("answer", ""))))
        rows["audio_start"].append(float(item.get("audio_start") or 0.0))
    dataset = datasets.Dataset.from_dict(rows)
    return _add_lengths(dataset, feature_extractor, num_proc) if compute_lengths else dataset


def _index_key(key):
    try:
        return (0, int(key), "")
    except (TypeError, ValueError):
        return (1, 0, str(key))


def load_jsonl(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    feature_extractor=None,
    compute_lengths: bool = True,
    num_proc: int | None = None,
):
    """
    Reads a JSONL file of `{"audio": <path>, "prompt": ..., "answer": ..., "audio_start"?: <s>}` lines (memory-mapped
    through `datasets`). Relative audio paths are taken from `data_root`, else from the file's folder. `"output"` is
    accepted for `"answer"`, `"name"` or `"path"` for `"audio"`.
    """
    import datasets

    path = Path(path)
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    renames = {"output": "answer", "name": "audio", "path": "audio"}
    for old, new in renames.items():
        if old in dataset.column_names and new not in dataset.column_names:
            dataset = dataset.rename_column(old, new)
    missing = {"audio", "prompt", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{path}: every line needs 'audio', 'prompt' and 'answer'; missing {sorted(missing)}.")
    base = path.parent

    def normalise(example):
        audio = example["audio"]
        if isinstance(audio, str):
            audio = _resolve_path(audio, data_root, base)
        return {
            "audio": audio,
            "prompt": str(example["prompt"]),
            "answer": str(example["answer"]),
            "audio_start": float(example.get("audio_start") or 0.0),
        }

    dataset = dataset.map(normalise, num_proc=num_proc, desc="reading manifest")
    return _add_lengths(dataset, feature_extractor, num_proc) if compute_lengths else dataset


def from_hf_dataset(
    dataset,
    audio_column: str = "audio",
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    feature_extractor=None,
    compute_lengths: bool = True,
    num_proc: int | None = None,
):
    """
    Prepares a `datasets.Dataset` with an audio column for training: the columns are renamed to `audio`, `prompt`,
    `answer`; an `Audio` column is cast to `Audio(decode=False)`, so that rows carry the encoded file (bytes or path)
    and the collator decodes it with AF2's own front end (libsndfile, first channel, soxr) in the data loader
    workers, whatever sampling rate the column was cast to; `num_windows` and `length` are added.
    """
    import datasets

    renames = {audio_column: "audio", prompt_column: "prompt", answer_column: "answer"}
    for old, new in renames.items():
        if old not in dataset.column_names:
            raise ValueError(f"the dataset has no {old!r} column (columns: {dataset.column_names}).")
        if old != new:
            if new in dataset.column_names:
                dataset = dataset.remove_columns(new)
            dataset = dataset.rename_column(old, new)
    if isinstance(dataset.features.get("audio"), datasets.Audio):
        dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    if "audio_start" not in dataset.column_names:
        dataset = dataset.add_column("audio_start", [0.0] * len(dataset))
    return _add_lengths(dataset, feature_extractor, num_proc) if compute_lengths else dataset


def load_training_data(
    source,
    data_root: str | os.PathLike | None = None,
    feature_extractor=None,
    compute_lengths: bool = True,
    num_proc: int | None = None,
    split: str = "train",
    **columns,
):
    """
    Any supported source as a training `datasets.Dataset`: a `datasets.Dataset`; a path to an AF2 dataset JSON
    (`.json` with a `data` mapping), a JSONL manifest (`.jsonl`), or a dataset saved with `save_to_disk`.
    """
    import datasets

    kwargs = {"feature_extractor": feature_extractor, "compute_lengths": compute_lengths, "num_proc": num_proc}
    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return from_hf_dataset(source, **columns, **kwargs)
    path = Path(source)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
        return from_hf_dataset(loaded, **columns, **kwargs)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training file or dataset directory.")
    if path.suffix == ".jsonl":
        return load_jsonl(path, data_root, **kwargs)
    if path.suffix == ".json":
        try:
            return load_af2_json(path, data_root, **kwargs)
        except json.JSONDecodeError:
            return load_jsonl(path, data_root, **kwargs)  # JSON lines under a .json name
    raise ValueError(
        f"{path}: unsupported training file; use an AF2 dataset .json, a .jsonl manifest or a datasets directory."
    )


__all__ = [
    "audio_duration",
    "count_windows",
    "from_hf_dataset",
    "length_key",
    "load_af2_json",
    "load_jsonl",
    "load_training_data",
]
