"""Crash-safe storage of generated rows: append-only JSONL parts, a settings sidecar, the merged output file.

Layout next to the output `OUT` (e.g. `captions.jsonl`):

    OUT                 the merged rows (JSONL, Parquet or CSV by extension), rewritten atomically by each merge
    OUT.meta.json       model, revision, dtype, generation settings and package versions of the rows
    OUT.errors.jsonl    one line per (clip, prompt) that could not be generated, with the reason
    OUT.parts/          the rows themselves: one append-only JSONL file per process and run

A row is appended and fsync'ed once its batch is generated, as one complete line. A process killed at any moment
(kill -9 included) leaves at most a last line without its newline, which the reader drops: only newline-terminated
lines count. Rows are told apart by their `id`; the parts are the source of truth and `OUT` is rebuilt from them, so
a resumed or extended run never loses nor duplicates a row.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
SIDECAR_FORMAT = "af2-generation-run/1"


def output_format(path: str | os.PathLike) -> str:
    """`jsonl`, `parquet` or `csv` from the output's extension (anything else is JSONL)."""
    return OUTPUT_FORMATS.get(Path(path).suffix.lower(), "jsonl")


def read_jsonl_lines(path: Path) -> Iterator[dict]:
    """
    The records of an append-only JSONL file. A last line without its newline is a write cut short by a crash and is
    skipped; any other line that is not a JSON object is corruption and an error naming the file and line.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    # The piece after the last newline is empty for an intact file and a torn write otherwise.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}, line {number}: not a JSON row ({error}); the file was changed by something else than "
                "af2 — remove or repair that line."
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
        yield record


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """Calls `write(tmp_path)`, fsyncs the file and renames it over `path`: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(path.parent)


class AppendOnlyJsonl:
    """One process's part file: each `append(records)` writes whole lines, flushes and fsyncs before returning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")  # noqa: SIM115 (held open for the run, closed in close())
        _fsync_directory(self.path.parent)

    def append(self, records: Iterable[dict]) -> None:
        payload = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        if not payload:
            return
        # One write per batch: a kill cuts at most the last line, which the reader drops.
        self._handle.write(payload)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


class RunStore:
    """The files of one output `OUT` (see the module docstring)."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        if self.output.is_dir():
            raise ValueError(f"output {self.output} is a directory; give a file name such as captions.jsonl.")
        self.format = output_format(self.output)
        self.sidecar = self.output.with_name(self.output.name + ".meta.json")
        self.errors = self.output.with_name(self.output.name + ".errors.jsonl")
        self.parts = self.output.with_name(self.output.name + ".parts")

    # -- settings ------------------------------------------------------------------------------------------------
    def check_settings(self, settings: dict) -> bool:
        """
        Compares `settings` with the sidecar of earlier runs: an error naming every difference when they differ, so
        that rows of other settings never mix silently into OUT. Returns whether a sidecar exists.
        """
        if not self.sidecar.is_file():
            return False
        recorded = json.loads(self.sidecar.read_text()).get("settings", {})
        differences = [
            f"{key}: {recorded.get(key)!r} before, {settings.get(key)!r} now"
            for key in sorted(set(recorded) | set(settings))
            if recorded.get(key) != settings.get(key)
        ]
        if differences:
            raise ValueError(
                f"{self.output} holds rows generated with other settings ({'; '.join(differences)}). Write to "
                "another output, or remove the output and its .meta.json, .errors.jsonl and .parts to start over."
            )
        return True

    def write_settings(self, settings: dict, versions: dict) -> None:
        record = {
            "format": SIDECAR_FORMAT,
            "settings": settings,
            "versions": versions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.sidecar, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))

    # -- parts ---------------------------------------------------------------------------------------------------
    def new_part(self, kind: str, rank: int) -> AppendOnlyJsonl:
        """A fresh part file for this process: a file cut by an earlier crash is never appended to."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        unique = os.urandom(4).hex()  # ranks of different nodes may share a pid
        return AppendOnlyJsonl(self.parts / f"{kind}-{stamp}-rank{rank:05d}-{unique}.jsonl")

    def _part_files(self, kind: str) -> list[Path]:
        """The compacted file of earlier merges first, then the parts written since, oldest first."""
        if not self.parts.is_dir():
            return []
        return sorted(self.parts.glob(f"{kind}-*.jsonl"), key=lambda path: (path.stem != f"{kind}-merged", path.name))

    def done_ids(self) -> set[str]:
        """The ids of the stored rows (ids only: a million rows stay a few dozen MB)."""
        return {record["id"] for path in self._part_files("rows") for record in read_jsonl_lines(path)}

    def read_rows(self) -> dict[str, dict]:
        """Every stored row by id (the first one wins should an id appear twice)."""
        rows: dict[str, dict] = {}
        for path in self._part_files("rows"):
            for record in read_jsonl_lines(path):
                rows.setdefault(record["id"], record)
        return rows

    def read_errors(self) -> dict[str, dict]:
        errors: dict[str, dict] = {}
        for path in self._part_files("errors"):
            for record in read_jsonl_lines(path):
                errors[record["id"]] = record  # the latest attempt's reason wins
        return errors

    # -- merge ---------------------------------------------------------------------------------------------------
    def merge(self, order: list[str]) -> tuple[int, int]:
        """
        Writes OUT from the parts: the rows of `order` first, in that order, then rows of earlier runs that this one
        did not ask for; the errors file gets the failures that have no row. The parts are compacted into one file.
        Returns (rows, errors) written. Safe to interrupt at any point: the next merge starts from the parts again.
        """
        rows = self.read_rows()
        position = {row_id: index for index, row_id in enumerate(order)}
        ordered = sorted(rows.values(), key=lambda row: (position.get(row["id"], len(order)),))
        errors = [e for row_id, e in self.read_errors().items() if row_id not in rows]
        errors.sort(key=lambda e: position.get(e["id"], len(order)))

        write_atomically(self.output, lambda tmp: write_rows(tmp, ordered, self.format))
        if errors:
            write_atomically(self.errors, lambda tmp: write_rows(tmp, errors, "jsonl"))
        elif self.errors.exists():
            self.errors.unlink()
        self._compact(ordered, errors)
        return len(ordered), len(errors)

    def _compact(self, rows: list[dict], errors: list[dict]) -> None:
        """Replaces all part files by one rows file and one errors file (a crash in between leaves duplicates, which
        the reader ignores)."""
        old = self._part_files("rows") + self._part_files("errors")
        merged_rows = self.parts / "rows-merged.jsonl"
        merged_errors = self.parts / "errors-merged.jsonl"
        write_atomically(merged_rows, lambda tmp: write_rows(tmp, rows, "jsonl"))
        write_atomically(merged_errors, lambda tmp: write_rows(tmp, errors, "jsonl"))
        for path in old:
            if path not in (merged_rows, merged_errors):
                path.unlink()
        _fsync_directory(self.parts)


def write_rows(path: Path, rows: list[dict], format: str) -> None:
    """Rows as JSONL, Parquet (needs pyarrow) or CSV."""
    if format == "jsonl":
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif format == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"writing {path.name.split('.tmp-')[0].lstrip('.')} as Parquet needs pyarrow: "
                "pip install transformers-af2[caption]"
            ) from None
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif format == "csv":
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"unknown output format {format!r}; use jsonl, parquet or csv.")


__all__ = ["AppendOnlyJsonl", "RunStore", "output_format", "read_jsonl_lines", "write_atomically", "write_rows"]
