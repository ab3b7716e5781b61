"""
Readers for the benchmarks' public file formats. Each returns a list of items: dicts with a unique `id`, the `audio`
path, the task's fields for the prompt (`question`, `choices`) and what its scorer needs (`answer`, `answers`,
`references`, `labels` + `label_set`). A reader fails on the first bad row, naming the file, the row and the problem.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from ..caption.inputs import read_utf8_text

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


def _require(condition: bool, source, message: str) -> None:
    if not condition:
        raise ValueError(f"{source}: {message}")


def _read_csv(path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(read_utf8_text(path), newline=""))
    rows = list(reader)
    columns = reader.fieldnames or []
    _require(bool(columns), path, "empty CSV file (no header row).")
    return rows


def _check_columns(path: Path, rows: list[dict], needed: tuple[str, ...]) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in needed if c not in present]
    _require(not missing and bool(rows), path, f"needs columns {list(needed)}; missing {missing or 'every row'}.")


def _audio_file(root: Path, name: str, source) -> str:
    path = root / name
    _require(path.is_file(), source, f"audio file {path} does not exist (set --audio-root to the audio folder).")
    return str(path)


def _data_file(data: Path, suffixes: tuple[str, ...]) -> Path:
    if data.is_dir():
        raise ValueError(f"{data}: expected a {' or '.join(suffixes)} file, got a directory.")
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such file.")
    return data


# mmau-test-mini.json as published in github.com/Sakshi113/MMAU, by the SHA-256 of the file: the original release
# (2024-10 to 2025-03) and MMAU-v05.15.25 (revised in place from 2025-05-15 on; ~25 % of the questions changed).
# Digests of the repository's files at each commit that changed them; a copy from elsewhere (re-serialised, the
# Hugging Face dataset) is named by its digest only.
MMAU_RELEASES = {
    "bef649e4bdeb436779a929ccdb9caa3f5144899bd087fc05e23065268ba888cc": "original test-mini (MMAU@1c6af99, 2024-10-23)",
    "a5006730ccb3fbf1fc72016774413b9b4a596bb00ce8f37796d9d30979b46192": "original test-mini (MMAU@78fe032, 2024-10-25)",
    "1b6d31d0b70c2944a064a5de0147435427af0bcd3167eff175daa8bd5321e9d3": "original test-mini (MMAU@26d9342, 2024-10-29)",
    "850c2794664d53c1f7e7e2bcf35744b9ab4e60debad2156d67efd6956220affa": "original test-mini (MMAU@a8d61f7, 2024-12-09)",
    "ed2fd6b6c24ebec1a5a496de5d767e7ebfe79556044d8f0d8bd00ad0cf02d623": "original test-mini (MMAU@a5cd89a, 2025-01-28)",
    "e8cc09223b497191781756212cb616315690aaa6ea7ac359db1b65d97d1e2433": "original test-mini (MMAU@1f675a9, 2025-03-25)",
    "d35ec10bc3097fc605661b0eed00a487da74a6e7d9e23736567312c632347400": "v05.15.25 test-mini (MMAU@6674fa1, 2025-05-15)",
    "9da96f00e43890adfbac3628b7b0dab3a32a6d6ec2d0a800b892ee261d35b818": "v05.15.25 test-mini (MMAU@f2017e3, 2025-05-16)",
    "ea9f3f53085a2dfcf9ea7f5b2fca76a6634cd212af084bbb4cd8bf22c8903537": "v05.15.25 test-mini (MMAU@2dcf44d, 2025-05-16)",
    "cafecebbb4e48b9eb83fd88916911a853245379812e08f118984510340b2dc5b": "v05.15.25 test-mini (MMAU@77fbb89, 2025-05-18)",
    "cc59d9e3fad1a675f311f341b53b05079b94e735e5bc8992ac881ebeda2976f5": "v05.15.25 test-mini (MMAU@8f62d71, 2025-05-19)",
    "157f1968a686c9e7ffb3669e13296349af72afe78af19c049e5d459ccb59d402": "v05.15.25 test-mini (MMAU@65c0574, 2025-05-22)",
    "e0042de8b99492539b0a17997b6c12fff90a6d42a47ad5fd8801c80dcb52b405": "v05.15.25 test-mini (MMAU@8415fc1, 2025-05-24)",
    "0bbabee60dcbd76815948394ac2dd31c41d18ab1215fe6fd6f93e0e510f78d7a": "v05.15.25 test-mini (MMAU@0a30c30, 2025-05-30)",
    "5c63fe8f2de12e848be146e48436567c2022fe84ea0012da560003c30a24b2b7": "v05.15.25 test-mini (MMAU@b070fb3, 2025-06-23)",
    "3940399a013d5f6d528ad4f5d1701cce29cdb5b19ccd4e6ab2800e0665dd6ac9": "v05.15.25 test-mini (MMAU@82f34fd, 2025-06-23)",
    "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c": "v05.15.25 test-mini (MMAU@f0a4a97, 2025-08-09)",
}


def mmau_release(sha256: str, items: list[dict]) -> str:
    """Which MMAU release a file is: a known one by its digest, else what can be told from the items."""
    if sha256 in MMAU_RELEASES:
        return MMAU_RELEASES[sha256]
    split = "test (answers withheld)" if all(item["answer"] == "" for item in items) else "with answers"
    return f"unknown release: {len(items)} items, {split}, sha256 {sha256[:16]}"


def read_mmau(data: Path, audio_root: Path | None) -> list[dict]:
    """
    MMAU's mmau-test-mini.json / mmau-test.json: a list of {id, audio_id, question, choices, answer, task, ...}.
    The test split withholds its answers (`"answer": ""` on every item): it is read, answered and exported for
    submission, not scored. Items keep every field of the file (the submission repeats them).
    """
    path = _data_file(data, (".json",))
    try:
        entries = json.loads(read_utf8_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    _require(isinstance(entries, list) and bool(entries), path, "expected a non-empty JSON list of questions.")
    withheld = all(isinstance(entry, dict) and entry.get("answer") == "" for entry in entries)
    root = audio_root or path.parent
    items, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"{path} item {index}"
        _require(isinstance(entry, dict), where, f"expected a JSON object, got {type(entry).__name__}.")
        missing = [k for k in ("id", "audio_id", "question", "choices", "answer") if k not in entry]
        _require(not missing, where, f"missing keys {missing}.")
        _require(isinstance(entry["choices"], list) and len(entry["choices"]) >= 2, where, "needs 2+ choices.")
        if not withheld:
            _require(
                entry["answer"] in entry["choices"],
                where,
                f"answer {entry['answer']!r} is not among its choices"
                + (" (only the test split withholds answers, on every item)." if entry["answer"] == "" else "."),
            )
        _require(str(entry["id"]) not in seen, where, f"duplicate id {entry['id']!r}.")
        seen.add(str(entry["id"]))
        item = dict(entry)
        item["id"] = str(entry["id"])
        item["audio"] = _audio_file(root, entry["audio_id"], where)
        items.append(item)
    return items


def read_clotho_aqa(data: Path, audio_root: Path | None) -> list[dict]:
    """
    ClothoAQA's clotho_aqa_{train,val,test}.csv: one row per annotator answer (file_name, QuestionText, answer, ...).
    Rows of the same file and question become one item with all `answers`.
    """
    path = _data_file(data, (".csv",))
    rows = _read_csv(path)
    _check_columns(path, rows, ("file_name", "QuestionText", "answer"))
    root = audio_root or path.parent / "audio_files"
    grouped: dict[tuple[str, str], dict] = {}
    for index, row in enumerate(rows):
        where = f"{path} row {index + 2}"
        question, answer = row["QuestionText"].strip(), row["answer"].strip()
        _require(bool(question) and bool(answer), where, "empty question or answer.")
        key = (row["file_name"], question)
        if key not in grouped:
            grouped[key] = {
                "id": f"{row['file_name']}|{question}",
                "audio": _audio_file(root, row["file_name"], where),
                "question": question,
                "answers": [],
            }
        grouped[key]["answers"].append(answer)
    return list(grouped.values())


def read_clotho_captions(data: Path, audio_root: Path | None) -> list[dict]:
    """Clotho-v2's clotho_captions_{development,validation,evaluation}.csv: file_name, caption_1 ... caption_5."""
    path = _data_file(data, (".csv",))
    rows = _read_csv(path)
    _check_columns(path, rows, ("file_name", "caption_1"))
    caption_columns = sorted((c for c in rows[0] if re.fullmatch(r"caption_\d+", c)), key=lambda c: int(c[8:]))
    root = audio_root or path.parent / "evaluation"
    items, seen = [], set()
    for index, row in enumerate(rows):
        where = f"{path} row {index + 2}"
        references = [row[c].strip() for c in caption_columns if row[c] and row[c].strip()]
        _require(bool(references), where, "no caption.")
        _require(row["file_name"] not in seen, where, f"duplicate file_name {row['file_name']!r}.")
        seen.add(row["file_name"])
        items.append(
            {"id": row["file_name"], "audio": _audio_file(root, row["file_name"], where), "references": references}
        )
    return items


def read_audiocaps(data: Path, audio_root: Path | None) -> list[dict]:
    """
    AudioCaps' {train,val,test}.csv: audiocap_id, youtube_id, start_time, caption, one row per caption. Rows of one
    clip become one item with all its `references` (the original deduplicates by clip and joins the references).
    The clip is looked up in the audio folder as `<youtube_id>`, `Y<youtube_id>` or `<audiocap_id>` with any audio
    extension (the names the common downloaders write).
    """
    path = _data_file(data, (".csv",))
    rows = _read_csv(path)
    _check_columns(path, rows, ("audiocap_id", "youtube_id", "caption"))
    root = audio_root or path.parent
    grouped: dict[str, dict] = {}
    for index, row in enumerate(rows):
        where = f"{path} row {index + 2}"
        clip = row["youtube_id"]
        caption = row["caption"].strip()
        _require(bool(caption), where, "empty caption.")
        if clip not in grouped:
            stems = (clip, f"Y{clip}", row["audiocap_id"])
            candidates = [root / f"{stem}{ext}" for stem in stems for ext in AUDIO_EXTENSIONS]
            found = next((p for p in candidates if p.is_file()), None)
            _require(
                found is not None, where, f"no audio for clip {clip} in {root} (tried {stems} + {AUDIO_EXTENSIONS})."
            )
            grouped[clip] = {"id": clip, "audio": str(found), "references": []}
        grouped[clip]["references"].append(caption)
    return list(grouped.values())


# ---------------------------------------------------------------------------------------------------------------------
# Classification: where the label comes from is declared per task (folder name, file-name code, CSV column)
# ---------------------------------------------------------------------------------------------------------------------


def _audio_files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def read_labels(
    data: Path,
    audio_root: Path | None,
    *,
    label_set: tuple[str, ...],
    label_from: str,
    label_map: dict[str, str] | None = None,
    filename_field: tuple[str, int] | None = None,
    csv_columns: tuple[str, str] | None = None,
    path_template: str | None = None,
    default_audio_root: str | None = None,
) -> list[dict]:
    """
    A single-label classification set. `label_from`:
    - "folder": `data` is a directory of one folder per label (GTZAN's genres/), or a text file of relative paths
      `label/file.wav` per line (GTZAN's split lists) under `--audio-root`;
    - "filename": `data` is a directory of files whose name, split by `filename_field[0]`, has the label code at
      `filename_field[1]` (CREMA-D's AudioWAV/, `1001_DFA_ANG_XX.wav`);
    - "csv": `data` is a CSV with `csv_columns = (path column, label column)`; `path_template` formats the audio path
      from the row (US8K's `fold{fold}/{slice_file_name}` under `audio/`); without `--audio-root` the files are
      looked up under `default_audio_root` relative to the CSV's folder (US8K: `../audio`).
    `label_map` turns raw codes into the label names the prompt and scorer use.
    """
    label_map = label_map or {}
    pairs: list[tuple[str, Path, str, str]] = []  # (id, audio, raw label, where)
    if label_from == "folder":
        if data.is_dir():
            pairs = [(str(p.relative_to(data)), p, p.parent.name, str(p)) for p in _audio_files_under(data)]
        else:
            root = audio_root or _data_file(data, (".txt",)).parent
            for number, line in enumerate(read_utf8_text(data).splitlines(), 1):
                if line.strip():
                    relative = Path(line.strip())
                    pairs.append((str(relative), root / relative, relative.parent.name, f"{data} line {number}"))
    elif label_from == "filename":
        _require(data.is_dir(), data, "expected the folder of audio files.")
        separator, field = filename_field
        for p in _audio_files_under(data):
            parts = p.stem.split(separator)
            _require(len(parts) > field, p, f"file name has no field {field} when split by {separator!r}.")
            pairs.append((str(p.relative_to(data)), p, parts[field], str(p)))
    elif label_from == "csv":
        path = _data_file(data, (".csv",))
        path_column, label_column = csv_columns
        rows = _read_csv(path)
        _check_columns(path, rows, (path_column, label_column))
        root = audio_root or (path.parent / default_audio_root if default_audio_root else path.parent)
        for index, row in enumerate(rows):
            relative = path_template.format(**row) if path_template else row[path_column]
            pairs.append((relative, root / relative, row[label_column], f"{path} row {index + 2}"))
    else:
        raise ValueError(f"label_from must be 'folder', 'filename' or 'csv', got {label_from!r}.")
    _require(bool(pairs), data, "no audio files found.")
    items, seen = [], set()
    for item_id, audio, raw, where in pairs:
        label = label_map.get(raw, raw)
        _require(label in label_set, where, f"label {raw!r} is not one of {list(label_set)}.")
        _require(audio.is_file(), where, f"audio file {audio} does not exist (set --audio-root).")
        _require(item_id not in seen, where, f"{item_id} is listed twice.")
        seen.add(item_id)
        items.append({"id": item_id, "audio": str(audio), "labels": [label], "label_set": list(label_set)})
    return items


def read_fsd50k(data: Path, audio_root: Path | None) -> list[dict]:
    """
    FSD50K's FSD50K.ground_truth/eval.csv: fname, labels (comma-separated, underscores for spaces), mids. The label
    set is vocabulary.csv beside it (index, label, mid; no header) when present, else every label the CSV uses.
    Audio: `<fname>.wav` in `--audio-root` (default: FSD50K.eval_audio/ beside the ground-truth folder).
    """
    path = _data_file(data, (".csv",))
    rows = _read_csv(path)
    _check_columns(path, rows, ("fname", "labels"))
    vocabulary_file = path.parent / "vocabulary.csv"
    name = lambda raw: raw.strip().replace("_", " ")  # noqa: E731
    if vocabulary_file.is_file():
        vocabulary = csv.reader(io.StringIO(read_utf8_text(vocabulary_file), newline=""))
        label_set = [name(row[1]) for row in vocabulary if len(row) >= 2]
    else:
        label_set = sorted({name(label) for row in rows for label in row["labels"].split(",") if label.strip()})
    known = set(label_set)
    root = audio_root or path.parent.parent / "FSD50K.eval_audio"
    items, seen = [], set()
    for index, row in enumerate(rows):
        where = f"{path} row {index + 2}"
        labels = [name(label) for label in row["labels"].split(",") if label.strip()]
        _require(bool(labels), where, "no label.")
        unknown = [label for label in labels if label not in known]
        _require(not unknown, where, f"labels {unknown} are not in {vocabulary_file.name}.")
        _require(row["fname"] not in seen, where, f"duplicate fname {row['fname']!r}.")
        seen.add(row["fname"])
        audio = _audio_file(root, f"{row['fname']}.wav", where)
        items.append({"id": row["fname"], "audio": audio, "labels": labels, "label_set": label_set})
    return items


READERS: dict[str, Callable[..., list[dict]]] = {
    "mmau": read_mmau,
    "clotho_aqa": read_clotho_aqa,
    "clotho_captions": read_clotho_captions,
    "audiocaps": read_audiocaps,
    "labels": read_labels,
    "fsd50k": read_fsd50k,
}
