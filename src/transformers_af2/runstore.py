"""
What every af2 batch command (`af2 caption`, `af2 eval`) promises about its output, kept in this one module:

- Ownership. An output is written only when af2 created it: a file or folder af2 did not create, a file that is
  an input of the run, or a directory where a file is expected (and the reverse) is refused with the reason;
  `overwrite=True` (`--overwrite`) starts anew and is the only way to replace it. A file af2 wrote and someone
  changed since (its size or mtime differ from what af2 recorded) counts as not af2's.
- One writer. A run holds an exclusive record lock (`lockf`) on a lock file beside its output for its whole duration; a second
  run into the same output is refused at once, naming the running one (pid, host, start, command). The kernel
  releases the lock of a killed process, so a lock left by a `kill -9` is taken over (and said so). On network file
  systems this relies on their lock support (NFSv4 has it).
- Provenance. The run's record (model id, weights fingerprint and dtype, data digests, prompts, generation
  settings, package versions) is written beside the output by the first run and compared on every resume: any
  difference refuses the run, naming each differing field.
- Crash safety. Rows are appended as whole lines and fsync'ed (`AppendOnlyJsonl`); a line cut by a kill has no
  newline and is dropped by the reader (`read_jsonl_lines`); merged files are written to a temporary file and
  renamed (`write_atomically`).

`RunStore` is a caption-style output `OUT` (rows merged from per-process parts); `RunFolder` is an eval-style output
folder. Both are a `RunOutput` for the ownership, lock and provenance.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
RECORD_FORMAT = "af2-run/2"
# Versions a resume must match: the code that computes the rows. Python and numpy are recorded for information.
STRICT_VERSIONS = ("transformers_af2", "transformers", "torch")


class OutputRefused(ValueError):
    """The output cannot be written by this run (not af2's, an input, busy, or made with other settings)."""


# ---------------------------------------------------------------------------------------------------------------------
# crash-safe files
# ---------------------------------------------------------------------------------------------------------------------


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


def fsync_directory(path: Path) -> None:
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


def write_atomically(path: Path, write, before_replace=None) -> None:
    """Calls `write(tmp_path)`, fsyncs the file and renames it over `path`: readers see the old or the new file.
    `before_replace(tmp_path)` runs between the two (the rename keeps the file's size and mtime)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_directory(path.parent)


def write_json_atomically(path: Path, record) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n"))


class AppendOnlyJsonl:
    """One process's part file: each `append(records)` writes whole lines, flushes and fsyncs before returning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")  # noqa: SIM115 (held open for the run, closed in close())
        fsync_directory(self.path.parent)

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


# ---------------------------------------------------------------------------------------------------------------------
# fingerprints: what a run's results depend on
# ---------------------------------------------------------------------------------------------------------------------


def file_stamp(path: str | os.PathLike) -> str | None:
    """`size:mtime_ns` of a file (None when it does not exist): cheap, and changes when the file is rewritten."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return f"{info.st_size}:{info.st_mtime_ns}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 1 << 16


def sampled_sha256(path: str | os.PathLike) -> str:
    """
    `size:sha256` of a weight file's first and last MiB and 64 blocks of 64 KiB spread evenly between them (the whole
    file when it is under 8 MiB): reads about 6 MiB of a multi-GB file, and the safetensors header (tensor names,
    shapes, dtypes) lies in the first MiB. Rewritten weights change their bytes everywhere, so any of these blocks
    tells; a change confined to bytes no block covers is not seen (documented in the README).
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= 8 << 20:
            digest.update(handle.read())
        else:
            digest.update(handle.read(1 << 20))
            step = (size - (2 << 20)) // (SAMPLE_BLOCKS + 1)
            for index in range(1, SAMPLE_BLOCKS + 1):
                handle.seek((1 << 20) + index * step)
                digest.update(handle.read(SAMPLE_BLOCK_BYTES))
            handle.seek(size - (1 << 20))
            digest.update(handle.read(1 << 20))
    return f"{size}:{digest.hexdigest()}"


# Weights, configs, tokenizers, and chat templates (`chat_template.jinja`: the prompt an AF3-family model is asked in).
_MODEL_FILE_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yaml", ".yml", ".model", ".txt", ".jinja",
)  # fmt: skip


def model_directory_files(directory: Path) -> dict[str, str]:
    """`sampled_sha256` of every weight, config and tokenizer file under a model directory (hidden ones left out)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() in _MODEL_FILE_SUFFIXES:
            files[str(relative)] = sampled_sha256(path)
    return files


def original_config_identity(original_config: str | os.PathLike | None) -> dict:
    """The part of a model's identity that `--config` adds: the original inference YAML that an original-layout
    checkpoint is converted with (the model's sizes and base model come from it), by `sampled_sha256`; `{}` without
    one. An OSError when it cannot be read. The path is taken as written, as the converter takes it."""
    if original_config is None:
        return {}
    return {"original_config": sampled_sha256(Path(original_config))}


def model_fingerprint(
    model, model_id: str | os.PathLike | None, original_config: str | os.PathLike | None = None
) -> dict:
    """
    What identifies the weights a run used, with their dtype and, for a quantized model, its quantization config:
    - a hub snapshot: its commit (`hub_revision`);
    - a local directory: `sampled_sha256` of every weight, config and tokenizer file in it (sub-folders included);
    - a model object without either: the SHA-256 of all its parameters and buffers (read once per run).
    With `original_config` (`--config`, loading `model_id` from the original layout), that YAML too.
    """
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the same files quantized otherwise give other answers
        dtype += " quantized " + json.dumps(quantizer.quantization_config.to_dict(), sort_keys=True, default=str)
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    directory = Path(os.path.expanduser(str(model_id))) if model_id is not None else None
    if directory is not None and directory.is_dir():
        return {
            "id": str(directory.resolve()),
            "dtype": dtype,
            "files": model_directory_files(directory),
            **original_config_identity(original_config),
        }
    if commit:
        return {
            "id": str(model_id),
            "dtype": dtype,
            "hub_revision": commit,
            **original_config_identity(original_config),
        }
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "id": str(model_id or getattr(model, "name_or_path", "")),
        "dtype": dtype,
        "parameters": digest.hexdigest(),
        # The YAML also sets what is not a parameter (the processor's windows: clap_config).
        **original_config_identity(original_config),
    }


def package_versions() -> dict:
    import numpy as np
    import torch
    import transformers

    from . import __version__

    return {
        "transformers_af2": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }


def strict_versions(versions: dict | None = None) -> dict:
    """The entries of `versions` (default: `package_versions()`) a resumed run must match: `STRICT_VERSIONS`' (other
    versions are recorded for information)."""
    versions = package_versions() if versions is None else versions
    return {name: version for name, version in versions.items() if name in STRICT_VERSIONS}


def record_differences(recorded, current, prefix: str = "") -> list[str]:
    """`field: was X, now Y` for each leaf that differs between two nested records (dotted field names)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in recorded:
                found.append(f"{name}: absent before, now {_short(current[key])}")
            elif key not in current:
                found.append(f"{name}: was {_short(recorded[key])}, absent now")
            else:
                found += record_differences(recorded[key], current[key], name)
        return found
    if recorded != current:
        return [f"{prefix}: was {_short(recorded)}, now {_short(current)}"]
    return []


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# the run lock
# ---------------------------------------------------------------------------------------------------------------------


def _describe_holder(holder: dict) -> str:
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
        f"({holder.get('command')})"
    )


# Record locks do not exclude the process that holds them, and closing any descriptor of a locked file drops its lock.
# So this process's own locks are kept here, by the file's (device, inode), with their holder records: a second
# RunLock on the same file in this process is refused from this table, without ever opening the file.
_HELD_HERE: dict[tuple[int, int], dict] = {}
_HELD_HERE_GUARD = threading.Lock()


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


class RunLock:
    """
    An exclusive POSIX record lock (`lockf`) on `path` for a run's whole duration; the file holds the holder's pid,
    host, start time and command line so that a refused run can name it. The file itself is never deleted (deleting a
    lock file lets two processes lock two different files of the same name).

    Why `lockf` and not `flock`: an flock belongs to the open file, which forked children (DataLoader workers) share,
    so a run killed with -9 would keep its output locked until its orphaned workers noticed and exited. A record
    lock belongs to the process alone and is dropped by the kernel the moment it dies. Its one rule: the holder must
    not open and close this file elsewhere (closing any descriptor of it drops the lock); nothing here does, and a
    second lock in the same process is refused from `_HELD_HERE` before the file is opened.
    """

    def __init__(self, path: Path, output: Path):
        self.path = Path(path)
        self.output = output
        self._handle = None
        self._identity: tuple[int, int] | None = None
        self.taken_over: dict | None = None  # the record of a run that ended without releasing (killed)

    def _refuse(self, holder: dict) -> OutputRefused:
        return OutputRefused(
            f"{self.output} is being written by another run: {_describe_holder(holder)}. Wait for it to end, "
            "or stop it; runs into one output never overlap."
        )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _HELD_HERE_GUARD:
            held = _HELD_HERE.get(_file_identity(self.path))
            if held is not None:
                raise self._refuse(held)
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run, closed in release())
            try:
                fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.seek(0)
                holder = _parse_holder(handle.read())
                handle.close()  # not ours: closing it drops no lock of this process
                if error.errno in (errno.EAGAIN, errno.EACCES):  # the two ways platforms say "held by another"
                    raise self._refuse(holder) from None
                raise
            handle.seek(0)
            previous = handle.read()
            if previous.strip():
                # The kernel dropped the lock of a process that died holding it; its record is still in the file.
                self.taken_over = _parse_holder(previous)
                print(f"af2: {self.output}: taking over from a run that ended without finishing: "
                      f"{_describe_holder(self.taken_over)}", file=sys.stderr, flush=True)  # fmt: skip
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": _command_line()[:500],
            }
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            stat = os.fstat(handle.fileno())
            self._identity = (stat.st_dev, stat.st_ino)
            _HELD_HERE[self._identity] = holder
            self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        # An empty file tells the next run that this one ended properly.
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        with _HELD_HERE_GUARD:
            fcntl.lockf(self._handle.fileno(), fcntl.LOCK_UN)
            _HELD_HERE.pop(self._identity, None)
            self._handle.close()
        self._handle = None


def _command_line() -> str:
    """This process's command as the user typed it: `af2 ...` for the command line however it was started."""
    if Path(sys.argv[0]).name in ("af2", "__main__.py", "cli.py"):
        return " ".join(["af2", *sys.argv[1:]])
    return " ".join(sys.argv)


def _parse_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    return holder if isinstance(holder, dict) else {"pid": "?", "host": "?", "started": "?", "command": "?"}


# ---------------------------------------------------------------------------------------------------------------------
# ownership + lock + provenance
# ---------------------------------------------------------------------------------------------------------------------


class RunOutput:
    """
    The ownership, the lock and the provenance record of one output (see the module docstring).

    Args:
        target: the output the user named (a file or a folder).
        record: the provenance file; its existence with af2's format marks the output as af2's.
        lock: the lock file.
        owned: every path the tool writes for this output (removed by `overwrite`).
        final: the owned files written whole at the end of a run; their size and mtime are recorded then, so that a
            later change by anyone else is noticed before they are replaced.
        inputs: files the run reads; none of them may be the output.
        overwrite: start anew, replacing what is there.
    """

    expects_folder = False
    command = "run"

    def __init__(self, target, *, record: Path, lock: Path, owned: list[Path], final: list[Path], inputs=(),
                 overwrite: bool = False):  # fmt: skip
        self.target = Path(target)
        self.record_path = record
        self.lock = RunLock(lock, self.target)
        self.owned = owned
        self.final = final
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.resumed = False

    # -- checks before anything is written ------------------------------------------------------------------------
    def _check_kind(self) -> None:
        if self.expects_folder and self.target.exists() and not self.target.is_dir():
            raise OutputRefused(f"output {self.target} is a file; the output of this command is a folder.")
        if not self.expects_folder and self.target.is_dir():
            raise OutputRefused(f"output {self.target} is a directory; give a file name such as captions.jsonl.")

    def _check_not_an_input(self) -> None:
        written = {}
        for path in (self.target, *self.owned):
            try:
                info = os.stat(path)
            except OSError:
                continue
            written[(info.st_dev, info.st_ino)] = path
        if not written:
            return
        for source in self.inputs:
            try:
                info = os.stat(source)
            except OSError:
                continue
            path = written.get((info.st_dev, info.st_ino))
            if path is not None:
                raise OutputRefused(f"output {path} is {source}, an input of this run; write elsewhere.")

    def foreign(self) -> list[Path]:
        """What is at the output and was not written by af2 (empty when af2 owns it all)."""
        raise NotImplementedError

    def _refuse_foreign(self) -> None:
        foreign = self.foreign()
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise OutputRefused(
                f"{foreign[0]}{more} was not written by af2 {self.command}, or was changed since; af2 replaces only "
                "what it wrote. Write to another output, or pass --overwrite to replace it."
            )

    def open(self, provenance: dict) -> bool:
        """
        Checks and locks the output for this run and records or compares `provenance`. Returns whether it resumes an
        earlier run. Raises `OutputRefused` with the reason.
        """
        self._check_kind()
        self._check_not_an_input()
        if not self.overwrite and not self.lock.path.exists():
            self._refuse_foreign()  # before a lock file is made: a refused run leaves nothing behind
        self.lock.acquire()
        try:
            if self.overwrite:
                self._remove_owned()  # af2's files only: a user's files beside them in a folder stay
            else:
                self._refuse_foreign()  # again under the lock
            recorded = self.read_record()
            if recorded is None:
                self.write_record({"format": RECORD_FORMAT, "provenance": provenance, "written": {}})
                self.resumed = False
                return False
            differences = record_differences(recorded.get("provenance"), provenance)
            if differences:
                listed = "; ".join(differences[:10]) + (
                    f"; and {len(differences) - 10} more" if len(differences) > 10 else ""
                )
                raise OutputRefused(
                    f"{self.target} holds results of a run with other settings or data: {listed}. "
                    "Resume with the same model, data and settings, write to another output, or pass --overwrite "
                    "to start anew."
                )
            self.resumed = True
            return True
        except BaseException:
            self.lock.release()
            raise

    def check(self, provenance: dict) -> None:
        """The comparison alone (data-parallel ranks other than the one that opened the output)."""
        recorded = self.read_record()
        differences = record_differences(recorded.get("provenance") if recorded else None, provenance)
        if differences:
            raise OutputRefused(f"{self.target}: the run's record differs: {'; '.join(differences)}.")

    def close(self) -> None:
        self.lock.release()

    # -- the record -----------------------------------------------------------------------------------------------
    def read_record(self) -> dict | None:
        if not self.record_path.is_file():
            return None
        try:
            record = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise OutputRefused(
                f"{self.record_path} is not a record of this af2 version ({RECORD_FORMAT}); the output was made by an "
                "older af2 or by something else. Write to another output, or pass --overwrite to start anew."
            )
        return record

    def write_record(self, record: dict) -> None:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.record_path, record)

    def write_final(self, path: Path, write) -> None:
        """
        Writes a final file atomically (see `write_atomically`) and records its size and mtime, so that a later change
        by anyone else is noticed. The new stamp is accepted before the rename and the old one dropped after it: a
        kill at any point leaves a file whose stamp the record accepts.
        """

        def accept(tmp: Path) -> None:
            self._set_accepted(path, [*self._accepted(path), file_stamp(tmp)])

        write_atomically(path, write, before_replace=accept)
        self._set_accepted(path, [file_stamp(path)])

    def remove_final(self, path: Path) -> None:
        if path.exists():
            path.unlink()
        self._set_accepted(path, [])

    def _accepted(self, path: Path) -> list[str]:
        return list((self.read_record() or {}).get("written", {}).get(path.name, []))

    def _set_accepted(self, path: Path, stamps: list[str]) -> None:
        record = self.read_record()
        record.setdefault("written", {})[path.name] = stamps
        self.write_record(record)

    def _changed_final_files(self, record: dict | None) -> list[Path]:
        written = (record or {}).get("written", {})
        return [path for path in self.final if path.exists() and file_stamp(path) not in written.get(path.name, [])]

    def _remove_owned(self) -> None:
        for path in self.owned:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


class RunStore(RunOutput):
    """
    The files of one caption-style output `OUT` (e.g. `captions.jsonl`):

        OUT                 the merged rows (JSONL, Parquet or CSV by extension), rewritten atomically by each merge
        OUT.meta.json       the provenance record (model, weights, dtype, generation settings, versions); af2's mark
        OUT.lock            the run lock (holder's pid, host, start, command while a run is on)
        OUT.errors.jsonl    one line per (clip, prompt) that could not be generated, with the reason
        OUT.parts/          the rows themselves: one append-only JSONL file per process and run

    Rows are told apart by their `id`; the parts are the source of truth and `OUT` is rebuilt from them, so a resumed
    or extended run never loses nor duplicates a row. Row fields starting with `_` (the clip's source stamp) stay in
    the parts and are left out of `OUT`.
    """

    def __init__(self, output: str | os.PathLike, *, inputs=(), overwrite: bool = False, command: str = "caption"):
        output = Path(output)
        self.output = output
        self.format = output_format(output)
        self.sidecar = output.with_name(output.name + ".meta.json")
        self.errors = output.with_name(output.name + ".errors.jsonl")
        self.parts = output.with_name(output.name + ".parts")
        self.command = command
        super().__init__(
            output,
            record=self.sidecar,
            lock=output.with_name(output.name + ".lock"),
            owned=[output, self.sidecar, self.errors, self.parts],
            final=[output, self.errors],
            inputs=inputs,
            overwrite=overwrite,
        )

    def foreign(self) -> list[Path]:
        if not self.sidecar.exists():
            # Without af2's record, anything at these names is someone else's.
            return [p for p in (self.output, self.errors, self.parts) if p.exists()]
        return self._changed_final_files(self.read_record())

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

    def stored_sources(self) -> dict[str, tuple]:
        """(path, source stamp) of every stored row by id: what a reused row was generated from."""
        found: dict[str, tuple] = {}
        for path in self._part_files("rows"):
            for record in read_jsonl_lines(path):
                found.setdefault(record["id"], (record.get("path"), record.get("_source")))
        return found

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

        public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in ordered]
        self.write_final(self.output, lambda tmp: write_rows(tmp, public, self.format))
        if errors:
            self.write_final(self.errors, lambda tmp: write_rows(tmp, errors, "jsonl"))
        else:
            self.remove_final(self.errors)
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
        fsync_directory(self.parts)


class RunFolder(RunOutput):
    """
    An output folder (`af2 eval --output DIR`): `run.json` is the record and af2's mark, `run.lock` the lock, `names`
    the files af2 writes inside. A folder that holds other files and no `run.json` is not af2's; files of the user
    beside af2's in an af2 folder are left alone (never replaced nor removed, `--overwrite` included).
    """

    expects_folder = True

    def __init__(self, folder, names: list[str], final: list[str], *, inputs=(), overwrite: bool = False,
                 command: str = "eval"):  # fmt: skip
        folder = Path(folder)
        self.folder = folder
        self.command = command
        owned = [folder / "run.json", *(folder / name for name in names)]
        super().__init__(
            folder,
            record=folder / "run.json",
            lock=folder / "run.lock",
            owned=owned,
            final=[folder / name for name in final],
            inputs=inputs,
            overwrite=overwrite,
        )

    def foreign(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        if not self.record_path.exists():
            locks = {self.lock.path.name} | {f"{path.name}.lock" for path in self.owned}
            return sorted(p for p in self.folder.iterdir() if p.name not in locks)
        return self._changed_final_files(self.read_record())


class Progress:
    """
    Progress of a run over `total` units, `already` of them done by earlier runs (printed once at the start): a tqdm
    bar when stderr is a terminal, else a line every `every` units (default: about 20 lines a run) and at the end, so
    that logs show it too. `enabled=False` prints nothing.
    """

    def __init__(self, total: int, *, already: int = 0, unit: str = "item", label: str = "af2",
                 enabled: bool | None = None, every: int | None = None, stream=None):  # fmt: skip
        self.total, self.already, self.unit, self.label = total, already, unit, label
        self.stream = stream or sys.stderr
        self.enabled = enabled is not False
        self.count = 0
        self.start = time.monotonic()
        self.every = every or max(1, total // 20)
        self._next = self.every
        self._bar = None
        if not self.enabled:
            return
        if already:
            print(
                f"{label}: resuming: {already} rows already done, {total} {unit}s to do", file=self.stream, flush=True
            )
        if enabled is None and not self.stream.isatty():
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, unit=unit, desc=label, file=self.stream, smoothing=0.1)

    def update(self, count: int = 1) -> None:
        if not self.enabled or count == 0:
            return
        self.count += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.count >= self._next or self.count == self.total:
            while self._next <= self.count:
                self._next += self.every
            self._line()

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        left = f", {(self.total - self.count) / rate:.0f} s left" if rate > 0 and self.count < self.total else ""
        print(f"{self.label}: {self.count}/{self.total} {self.unit}s ({rate:.2f}/s{left})", file=self.stream,
              flush=True)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = [
    "AppendOnlyJsonl",
    "OutputRefused",
    "Progress",
    "RunFolder",
    "RunLock",
    "RunOutput",
    "RunStore",
    "file_sha256",
    "file_stamp",
    "model_fingerprint",
    "output_format",
    "package_versions",
    "read_jsonl_lines",
    "record_differences",
    "sampled_sha256",
    "strict_versions",
    "write_atomically",
    "write_json_atomically",
    "write_rows",
]
