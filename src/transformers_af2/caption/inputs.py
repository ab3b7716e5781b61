"""What to caption: audio files, folders, lists of paths, CSV/JSONL/Parquet manifests and `datasets` datasets,
turned into `Clip`s with stable ids."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runstore import file_stamp

logger = logging.getLogger(__name__)

# What libsndfile (the feature extractor's reader) decodes.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au")
LIST_EXTENSIONS = (".txt", ".lst")
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")
# Column names tried, in order, when the manifest's columns are not named explicitly.
PATH_COLUMNS = ("path", "audio_path", "audio", "file", "filename", "filepath")
ID_COLUMN = "id"
PROMPT_COLUMN = "prompt"


@dataclass(frozen=True)
class DatasetAudio:
    """Row `index` of a `datasets` dataset's audio column, read in the DataLoader worker (not when listing)."""

    dataset: Any
    column: str
    index: int

    def read(self):
        return self.dataset[self.index][self.column]


@dataclass(frozen=True)
class Clip:
    """
    One audio to answer about.

    Args:
        clip_id: stable name of the clip across runs and process counts (the manifest's id, the normalised path, or
            `dataset[split]#index`); rows are identified by it and the prompt.
        audio: what the feature extractor reads — a path, bytes, an array dict — or a `DatasetAudio`.
        path: the audio file, when there is one (written to the rows).
        index: the row index in a dataset or manifest (written to the rows).
        prompt: this clip's own question (a manifest's prompt column); None to ask the run's prompts.
        source: what the clip's audio was when listed (`size:mtime_ns` of its file, the dataset's fingerprint); a
            stored row is reused only while it is the same.
    """

    clip_id: str
    audio: Any
    path: str | None = None
    index: int | None = None
    prompt: str | None = None
    source: str | None = None

    def read_audio(self):
        return self.audio.read() if isinstance(self.audio, DatasetAudio) else self.audio


def row_id(clip_id: str, prompt: str) -> str:
    """The stable id of the row for (clip, prompt): 16 hex digits of SHA-256."""
    return hashlib.sha256(f"{clip_id}\n{prompt}".encode()).hexdigest()[:16]


def shard_of(clip_id: str, world_size: int) -> int:
    """The process rank that handles a clip: a hash of its id, so the split needs no coordination and a resume with
    another number of processes still finds every row."""
    return int(hashlib.sha256(clip_id.encode()).hexdigest()[:15], 16) % world_size


def _normalised(path: Path | str) -> str:
    return os.path.normpath(str(path))


def display_path(path: str | os.PathLike) -> str:
    """
    A path as text: a name that is not valid UTF-8 (read from disk as surrogate escapes) shows its undecodable bytes
    as `\\xNN`, so that rows, ids and messages can be written; the clip still reads the file by its real name.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _audio_file_clip(path: Path | str) -> Clip:
    """A file as a clip: its id is the resolved path, so one file reached by several paths (relative and absolute,
    through symlinks) is one clip."""
    name = _normalised(path)
    resolved = os.path.realpath(name)
    if display_path(name) != name:
        logger.warning(
            "%s: the file name is not valid UTF-8; rows show its undecodable bytes as \\xNN", display_path(name)
        )
    return Clip(clip_id=display_path(resolved), audio=name, path=display_path(name), source=file_stamp(resolved))


def _folder_clips(folder: Path, extensions: tuple[str, ...]) -> list[Clip]:
    """Audio files under `folder` in sorted order (a folder's files before its sub-folders, as os.walk lists them).
    Symlinked folders are followed, each real folder once: a link back to a parent (a loop) is not entered again."""
    found: list[str] = []
    visited: set[tuple[int, int]] = set()

    def walk(directory: str) -> None:
        try:
            info = os.stat(directory)
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            logger.warning("%s: skipped, cannot be listed (%s)", display_path(directory), error.strerror)
            return
        if (info.st_dev, info.st_ino) in visited:
            return
        visited.add((info.st_dev, info.st_ino))
        folders = []
        for entry in entries:
            try:
                if entry.is_dir():
                    folders.append(entry.path)
                elif entry.name.lower().endswith(extensions) and entry.is_file():
                    found.append(entry.path)
            except OSError:  # a dangling or looping symlink: nothing to read
                continue
        for sub in folders:
            walk(sub)

    walk(str(folder))
    return [_audio_file_clip(path) for path in found]


def _relative_to(base: Path, value: str) -> str:
    path = Path(os.path.expanduser(value))
    return _normalised(path if path.is_absolute() else base / path)


def _list_clips(list_file: Path) -> list[Clip]:
    """A text file with one audio path per line (relative paths are relative to the list's folder; # comments).
    Names that are not UTF-8 are read as the bytes they are (surrogate escapes), like file names on disk."""
    clips = []
    text = list_file.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            clips.append(_audio_file_clip(_relative_to(list_file.parent, line)))
    return clips


def read_utf8_text(path: Path) -> str:
    """A text file's content (UTF-8, a byte-order mark accepted); any other encoding is an error naming the line."""
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 (byte 0x{data[error.start]:02x} at column {column}); save the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _manifest_records(manifest: Path) -> list[dict]:
    suffix = manifest.suffix.lower()
    if suffix in (".csv", ".tsv"):
        handle = io.StringIO(read_utf8_text(manifest), newline="")
        return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(read_utf8_text(manifest).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest}, line {number}: not JSON ({error}).") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f'{manifest}, line {number}: expected a JSON object such as {{"path": "a.wav"}}, got a '
                    f"{type(record).__name__}."
                )
            records.append(record)
        return records
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"{manifest}: reading Parquet needs pyarrow: pip install transformers-af2[caption]"
        ) from None
    return pq.read_table(manifest).to_pylist()


def _pick_column(name: str | None, columns: list[str], candidates: tuple[str, ...], what: str, source) -> str | None:
    if name is not None:
        if name not in columns:
            raise ValueError(f"{source}: no {what} column {name!r}; its columns are {columns}.")
        return name
    return next((c for c in candidates if c in columns), None)


def _manifest_clips(manifest: Path, path_column: str | None, id_column: str | None, prompt_column: str | None):
    records = _manifest_records(manifest)
    if not records:
        return []
    columns = list(records[0])
    path_key = _pick_column(path_column, columns, PATH_COLUMNS, "path", manifest)
    if path_key is None:
        raise ValueError(
            f"{manifest}: no path column among {columns}; name it with --path-column (tried {list(PATH_COLUMNS)})."
        )
    id_key = _pick_column(id_column, columns, (ID_COLUMN,), "id", manifest)
    prompt_key = _pick_column(prompt_column, columns, (PROMPT_COLUMN,), "prompt", manifest)
    clips = []
    for index, record in enumerate(records):
        value = record.get(path_key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{manifest}, row {index}: empty {path_key!r}; every row needs an audio path.")
        clip = _audio_file_clip(_relative_to(manifest.parent, value.strip()))
        if id_key is not None and record.get(id_key) not in (None, ""):
            clip = dataclasses.replace(clip, clip_id=str(record[id_key]))
        prompt = record.get(prompt_key) if prompt_key is not None else None
        prompt = prompt if isinstance(prompt, str) and prompt.strip() else None
        clips.append(dataclasses.replace(clip, index=index, prompt=prompt))
    return clips


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json"))


def _dataset_clips(source: str, split: str | None, audio_column: str, id_column, prompt_column) -> list[Clip]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{source}: reading a dataset needs datasets: pip install transformers-af2[train]") from None
    if is_saved_dataset(Path(source)):
        loaded = datasets.load_from_disk(source)
    else:
        loaded = datasets.load_dataset(source, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{source} has the splits {list(loaded)}; choose one with --split.")
        if split not in loaded:
            raise ValueError(f"{source} has no split {split!r}; its splits are {list(loaded)}.")
        loaded = loaded[split]
    columns = loaded.column_names
    if audio_column not in columns:
        raise ValueError(
            f"{source}: no audio column {audio_column!r}; its columns are {columns} (see --audio-column)."
        )
    if isinstance(loaded.features[audio_column], datasets.Audio):
        # Undecoded {"path", "bytes"}: the feature extractor reads them itself (first channel, soxr), and datasets'
        # own decoder (torchcodec) is not needed.
        loaded = loaded.cast_column(audio_column, datasets.Audio(decode=False))
    id_key = _pick_column(id_column, columns, (ID_COLUMN,), "id", source)
    prompt_key = _pick_column(prompt_column, columns, (PROMPT_COLUMN,), "prompt", source)
    ids = loaded[id_key] if id_key is not None else None
    prompts = loaded[prompt_key] if prompt_key is not None else None
    name = f"{_normalised(source)}[{split or 'train'}]"
    fingerprint = getattr(loaded, "_fingerprint", None)
    clips = []
    for index in range(len(loaded)):
        prompt = prompts[index] if prompts is not None else None
        clips.append(
            Clip(
                clip_id=str(ids[index]) if ids is not None else f"{name}#{index}",
                audio=DatasetAudio(loaded, audio_column, index),
                index=index,
                prompt=prompt if isinstance(prompt, str) and prompt.strip() else None,
                source=f"{fingerprint}#{index}" if fingerprint else None,
            )
        )
    return clips


def discover_clips(
    inputs: list[str | os.PathLike],
    *,
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
    dataset: bool = False,
    split: str | None = None,
    audio_column: str = "audio",
    path_column: str | None = None,
    id_column: str | None = None,
    prompt_column: str | None = None,
) -> list[Clip]:
    """
    The clips of `inputs`, in order, each listed once.

    An input is: an audio file; a folder (searched recursively for `extensions`, in sorted order, each real folder
    once; a folder saved by `datasets` is read as a dataset); a `.txt`/`.lst` list of paths; a
    `.csv`/`.tsv`/`.jsonl`/`.parquet` manifest with a path column (and optionally an id and a prompt column); or, with
    `dataset=True`, anything `datasets.load_dataset` takes (hub id or local path), of which `split` and
    `audio_column` are read.

    Identity: a file's clip id is its resolved path, so a file reached by several paths is one clip; a manifest's id
    column names its clips instead. One id (with one prompt) listed again for the same file is kept once; one id
    naming two different files is an error listing them.
    """
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    clips: list[Clip] = []
    for item in inputs:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if dataset or is_saved_dataset(path):
            clips.extend(_dataset_clips(text, split, audio_column, id_column, prompt_column))
        elif path.is_dir():
            found = _folder_clips(path, extensions)
            if not found:
                raise ValueError(f"{text}: no audio files ({', '.join(extensions)}) in this folder or below.")
            clips.extend(found)
        elif not path.exists():
            raise FileNotFoundError(f"{text}: no such file or folder.")
        elif path.suffix.lower() in LIST_EXTENSIONS:
            clips.extend(_list_clips(path))
        elif path.suffix.lower() in MANIFEST_EXTENSIONS:
            clips.extend(_manifest_clips(path, path_column, id_column, prompt_column))
        else:
            # Any other file is taken as audio; an undecodable one goes to the errors file like any bad clip.
            clips.append(_audio_file_clip(path))
    return _unique(clips)


def _audio_identity(clip: Clip):
    if isinstance(clip.audio, DatasetAudio):
        return (id(clip.audio.dataset), clip.audio.index)
    if isinstance(clip.audio, (str, os.PathLike)):
        return os.path.realpath(clip.audio)
    return clip.clip_id


def _unique(clips: list[Clip]) -> list[Clip]:
    unique: dict[tuple[str, str | None], Clip] = {}
    conflicts: list[str] = []
    for clip in clips:
        key = (clip.clip_id, clip.prompt)
        kept = unique.setdefault(key, clip)
        if kept is not clip and _audio_identity(kept) != _audio_identity(clip):
            conflicts.append(f"id {clip.clip_id!r}: {kept.path or kept.index} and {clip.path or clip.index}")
    if conflicts:
        raise ValueError(
            f'{len(conflicts)} clip id(s) name two different files (ids are compared as text, so 1 and "1" are one '
            f"id): {'; '.join(conflicts[:10])}{' ...' if len(conflicts) > 10 else ''}. Give each clip its own id."
        )
    return list(unique.values())


__all__ = [
    "AUDIO_EXTENSIONS",
    "Clip",
    "DatasetAudio",
    "discover_clips",
    "display_path",
    "is_saved_dataset",
    "read_utf8_text",
    "row_id",
    "shard_of",
]
