"""
Readers for the benchmarks' public file formats. Each returns a list of items: dicts with a unique `id`, the `audio`
path, the task's fields for the prompt (`question`, `choices`) and what its scorer needs (`answer`, `answers`,
`references`, `labels` + `label_set`). A reader fails on the first bad row, naming the file, the row and the problem.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


def _require(condition: bool, source, message: str) -> None:
    if not condition:
        raise ValueError(f"{source}: {message}")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
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


def read_mmau(data: Path, audio_root: Path | None) -> list[dict]:
    """MMAU's mmau-test-mini.json / mmau-test.json: a list of {id, audio_id, question, choices, answer, task, ...}."""
    path = _data_file(data, (".json",))
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    _require(isinstance(entries, list) and bool(entries), path, "expected a non-empty JSON list of questions.")
    root = audio_root or path.parent
    items, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"{path} item {index}"
        missing = [k for k in ("id", "audio_id", "question", "choices", "answer") if k not in entry]
        _require(not missing, where, f"missing keys {missing}.")
        _require(isinstance(entry["choices"], list) and len(entry["choices"]) >= 2, where, "needs 2+ choices.")
        _require(entry["answer"] in entry["choices"], where, f"answer {entry['answer']!r} is not among its choices.")
        _require(entry["id"] not in seen, where, f"duplicate id {entry['id']!r}.")
        seen.add(entry["id"])
        item = {k: v for k, v in entry.items() if k != "audio_id"}
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
            for number, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
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
        with open(vocabulary_file, newline="", encoding="utf-8") as handle:
            label_set = [name(row[1]) for row in csv.reader(handle) if len(row) >= 2]
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
