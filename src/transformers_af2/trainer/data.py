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

import contextlib
import json
import logging as std_logging
import math
import os
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..processing.training_batch import audio_duration, count_windows, default_feature_extractor, describe_audio

logger = logging.get_logger(__name__)

LENGTH_TEXT_SLOTS = 4096


def length_key(num_windows: int, prompt: Any, answer: Any) -> int:
    """`num_windows * 4096 + min(characters of prompt and answer, 4095)`."""
    text = len(str(prompt or "")) + len(str(answer or ""))
    return int(num_windows) * LENGTH_TEXT_SLOTS + min(text, LENGTH_TEXT_SLOTS - 1)


def _add_lengths(dataset, feature_extractor=None, num_proc: int | None = None, family=None):
    # The family's window count (`ModelFamily.training_windows`), else AF2's front end's.
    if family is not None:
        windows_of = family.training_windows
    else:
        extractor = default_feature_extractor(feature_extractor)

        def windows_of(audio, audio_start):
            return count_windows(audio, extractor, audio_start)

    def add(example):
        windows = windows_of(example["audio"], example.get("audio_start") or 0.0)
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
    family=None,
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
        if name is None:  # reported by check_training_data, as a missing audio
            rows["audio"].append(None)
            rows["prompt"].append(_text_or_none(item.get("prompt")))
            rows["answer"].append(_text_or_none(item.get("output", item.get("answer"))))
            rows["audio_start"].append(float(item.get("audio_start") or 0.0))
            continue
        if not isinstance(name, str):
            raise ValueError(
                f"{path}: item {index} has name {name!r}; only a single audio path per item is supported "
                "(as in the original)."
            )
        if split_path:
            name = os.path.join(split_path, name)
        rows["audio"].append(_resolve_path(name, data_root, path.parent))
        rows["prompt"].append(_text_or_none(item.get("prompt")))
        rows["answer"].append(_text_or_none(item.get("output", item.get("answer"))))
        rows["audio_start"].append(float(item.get("audio_start") or 0.0))
    dataset = datasets.Dataset.from_dict(rows)
    return _add_lengths(dataset, feature_extractor, num_proc, family) if compute_lengths else dataset


def _text_or_none(value: Any) -> str | None:
    """A text field as read: numbers become their text (`"output": 7` -> "7"); a missing field or anything else
    (null, a list, an object) becomes None, which `check_training_data` reports, instead of the text "None"."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


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
    family=None,
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
            "prompt": _text_or_none(example["prompt"]),
            "answer": _text_or_none(example["answer"]),
            "audio_start": float(example.get("audio_start") or 0.0),
        }

    dataset = dataset.map(normalise, num_proc=num_proc, desc="reading manifest")
    return _add_lengths(dataset, feature_extractor, num_proc, family) if compute_lengths else dataset


def from_hf_dataset(
    dataset,
    audio_column: str = "audio",
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    feature_extractor=None,
    compute_lengths: bool = True,
    num_proc: int | None = None,
    family=None,
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
    return _add_lengths(dataset, feature_extractor, num_proc, family) if compute_lengths else dataset


def load_training_data(
    source,
    data_root: str | os.PathLike | None = None,
    feature_extractor=None,
    compute_lengths: bool = True,
    num_proc: int | None = None,
    split: str = "train",
    family=None,
    **columns,
):
    """
    Any supported source as a training `datasets.Dataset`: a `datasets.Dataset`; a path to an AF2 dataset JSON
    (`.json` with a `data` mapping), a JSONL manifest (`.jsonl`), or a dataset saved with `save_to_disk`. The
    `num_windows` column counts the windows of `family` (a `families.ModelFamily`) when given, else of
    `feature_extractor` (AF2's front end).
    """
    import datasets

    kwargs = {
        "feature_extractor": feature_extractor,
        "compute_lengths": compute_lengths,
        "num_proc": num_proc,
        "family": family,
    }
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


# ---------------------------------------------------------------------------------------------------------------
# Checking every row before training
# ---------------------------------------------------------------------------------------------------------------
MISSING_FIELD = "missing field"
UNREADABLE_AUDIO = "unreadable audio"
NO_TRAINABLE_LABEL = "no trainable label"


@dataclass
class DataCheck:
    """What `check_training_data` found: rows read, rows dropped (each with its reason), and the counts of rows that
    are kept but deserve a look."""

    source: str
    rows: int
    max_length: int
    dropped: list[dict] = field(default_factory=list)  # {"row", "audio", "prompt", "kind", "reason"}
    empty_answers: int = 0
    over_long: int = 0

    @property
    def kept(self) -> int:
        return self.rows - len(self.dropped)

    def __str__(self) -> str:
        kinds = Counter(entry["kind"] for entry in self.dropped)
        dropped = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        return (
            f"{self.source}: {self.rows} rows, {self.kept} kept, {len(self.dropped)} bad"
            f"{f' ({dropped})' if dropped else ''}; {self.empty_answers} with an empty answer (trained on "
            f"<|endofchunk|> and eos only); {self.over_long} longer than max_length={self.max_length} tokens"
        )


@contextlib.contextmanager
def _quiet_loggers(names):
    # The front end warns once per long or silent clip; while checking thousands of rows that is noise.
    loggers = [std_logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def check_row(example: Mapping[str, Any], collator) -> dict:
    """
    Checks one row the way the collator will use it: `prompt` and `answer` are text, the audio decodes (from
    `audio_start` on) with the family's front end, and the training text keeps at least one trainable label
    under the collator's `max_length`. Returns `{"kind", "reason"}` ("" when the row is good) and the flags
    `empty_answer`, `over_long`.
    """
    from ..families import UnreadableAudio

    result = {"kind": "", "reason": "", "empty_answer": False, "over_long": False}
    for key in (collator.prompt_key, collator.answer_key):
        value = example.get(key)
        if not isinstance(value, str):
            what = "missing" if value is None else f"not text ({type(value).__name__})"
            return {**result, "kind": MISSING_FIELD, "reason": f"'{key}' is {what}"}
    if example.get(collator.audio_key) is None:
        return {**result, "kind": MISSING_FIELD, "reason": f"'{collator.audio_key}' is missing"}
    start = example.get("audio_start") or 0.0
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not math.isfinite(start) or start < 0:
        return {**result, "kind": MISSING_FIELD, "reason": f"'audio_start' must be seconds >= 0, got {start!r}"}
    try:
        with _quiet_loggers(collator.family.per_clip_loggers):
            tokens, trainable = collator.check(example)
    except UnreadableAudio as error:
        return {**result, "kind": UNREADABLE_AUDIO, "reason": f"cannot read its audio: {error}"}

    result["empty_answer"] = not example[collator.answer_key].strip()
    result["over_long"] = tokens > collator.max_length
    if not trainable:
        why = (
            f"its training text is {tokens} tokens, over max_length={collator.max_length}, so its answer is cut"
            if result["over_long"]
            else "the label rule keeps no token of it"
        )
        return {**result, "kind": NO_TRAINABLE_LABEL, "reason": f"nothing to train on: {why}"}
    return result


def check_training_data(
    dataset,
    collator,
    skip_bad_rows: bool = False,
    dropped_rows_file: str | os.PathLike | None = None,
    source: str = "the training data",
    num_proc: int | None = None,
):
    """
    Reads every row of a training dataset before any model is loaded (see `check_row`): a row whose fields are
    missing or not text, whose audio does not decode, or that leaves no trainable label (an answer cut by
    `max_length`) is bad. Rows with an empty answer and rows longer than `max_length` are counted.

    Args:
        dataset: a dataset from the readers of this module (`load_training_data`, ...).
        collator: the `AudioFlamingo2DataCollator` the training uses (its tokenizer, front end and `max_length`).
        skip_bad_rows: False (default): any bad row raises a `ValueError` that names the rows and why. True: bad rows
            are dropped and each is written to `dropped_rows_file` (JSON lines `{"row", "audio", "prompt", "kind",
            "reason"}`, `row` the 0-based row of the dataset).
        source: how the summary and errors name the data (e.g. its path).

    Returns:
        `(dataset of the kept rows, DataCheck)`; the summary is also logged.
    """

    def check(example):
        return {"_check_" + key: value for key, value in check_row(example, collator).items()}

    # Only the findings come back (a few bytes a row, kept in memory): no copy of the data, no cache file.
    checked = dataset.map(
        check,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=f"af2-check-{uuid.uuid4().hex}",  # the collator (a tokenizer) is not worth hashing
        desc="checking every row",
    )
    report = DataCheck(source=source, rows=len(dataset), max_length=collator.max_length)
    kinds, reasons = checked["_check_kind"], checked["_check_reason"]
    report.empty_answers = sum(checked["_check_empty_answer"])
    report.over_long = sum(checked["_check_over_long"])
    for row, kind in enumerate(kinds):
        if kind:
            example = dataset[row]
            report.dropped.append(
                {
                    "row": row,
                    "audio": None if example.get("audio") is None else describe_audio(example["audio"]),
                    "prompt": example.get("prompt"),
                    "kind": kind,
                    "reason": reasons[row],
                }
            )
    if report.dropped and not skip_bad_rows:
        listed = "; ".join(
            f"row {entry['row']} ({entry['audio']}): {entry['reason']}" for entry in report.dropped[:10]
        )
        more = f"; and {len(report.dropped) - 10} more" if len(report.dropped) > 10 else ""
        raise ValueError(
            f"{report}. Bad rows: {listed}{more}. Fix them, or pass --skip-bad-rows (skip_bad_rows=True) to drop them "
            "and list each in a file."
        )
    if dropped_rows_file is not None and skip_bad_rows:
        Path(dropped_rows_file).parent.mkdir(parents=True, exist_ok=True)
        with open(dropped_rows_file, "w") as handle:
            for entry in report.dropped:
                handle.write(json.dumps(entry) + "\n")
    if report.empty_answers or report.over_long or report.dropped:
        logger.warning(str(report))
    else:
        logger.info(str(report))
    if report.dropped:
        bad = {entry["row"] for entry in report.dropped}
        dataset = dataset.select([row for row in range(len(dataset)) if row not in bad])
    return dataset, report


__all__ = [
    "DataCheck",
    "audio_duration",
    "check_row",
    "check_training_data",
    "count_windows",
    "from_hf_dataset",
    "length_key",
    "load_af2_json",
    "load_jsonl",
    "load_training_data",
]
