"""Writing a conversion: only ever replaces an earlier conversion, atomically, with normal permissions."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from .errors import ConversionError

# Written into every converted repository. Its presence is what lets a later conversion replace the folder: a folder
# without it (user files, a fine-tune saved with save_pretrained, the source itself) is never deleted unasked.
CONVERSION_MARKER = "af2_conversion.json"
_STAGING_TAG = "af2-staging"
_BACKUP_TAG = "af2-replaced"


def is_af2_conversion(path: str | os.PathLike) -> bool:
    """True for a directory this converter wrote: it holds the marker file and an AF2 config.json."""
    path = Path(path)
    try:
        marker = json.loads((path / CONVERSION_MARKER).read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and isinstance(config, dict) and config.get("model_type") == "audioflamingo2"


def check_output(output: str | os.PathLike, source_dir: str | os.PathLike | None = None, overwrite: bool = False):
    """
    Raises ConversionError when writing `output` could destroy something that is not an earlier conversion: the
    source checkpoint (output equal to it, inside it or containing it, symlinks resolved), the current or home
    directory (or a parent of them), or an existing path that is not an AF2 conversion (allowed with `overwrite`).
    """
    output = Path(output)
    resolved = output.resolve()
    if source_dir is not None:
        source = Path(source_dir).resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            relation = "is" if resolved == source else ("contains" if resolved in source.parents else "is inside")
            raise ConversionError(
                f"output {output} {relation} the source checkpoint {source_dir}; choose an output folder elsewhere."
            )
    for place, what in ((Path.cwd().resolve(), "the current directory"), (Path.home().resolve(), "your home")):
        if resolved == place or resolved in place.parents:
            raise ConversionError(f"output {output} is or contains {what}; choose a new folder for the conversion.")
    if (output.exists() or output.is_symlink()) and not overwrite and not is_af2_conversion(output):
        raise ConversionError(
            f"output {output} exists and is not an earlier AF2 conversion (no {CONVERSION_MARKER}); refusing to "
            "replace it. Choose another folder, or pass --overwrite (overwrite=True) to replace it."
        )


def save_atomically(
    model,
    processor,
    output: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
) -> Path:
    """
    Writes the repository into a staging sibling, then renames it into place, so `output` is at every moment either
    absent, the previous conversion or the complete new one. An existing `output` is replaced only when it is an
    earlier conversion (or `overwrite`); see `check_output`. The staging and backup names carry this process's
    host and pid, so a later run can remove what a killed one left (`remove_stale_staging`).
    """
    output = Path(output)
    check_output(output, source_dir, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    staging = _unique_sibling(output, _STAGING_TAG)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / CONVERSION_MARKER).write_text(json.dumps(provenance or {}, indent=2, sort_keys=True) + "\n")
        _apply_umask(staging)
        check_output(output, source_dir, overwrite)  # the folder may have changed during the conversion
        if output.exists() or output.is_symlink():
            backup = _unique_sibling(output, _BACKUP_TAG, create=False)
            output.rename(backup)
            try:
                staging.rename(output)
            except BaseException:
                backup.rename(output)
                raise
            _remove(backup)
        else:
            staging.rename(output)
    except BaseException:
        _remove(staging)
        raise
    return output


def _unique_sibling(output: Path, tag: str, create: bool = True) -> Path:
    """`.NAME.TAG.HOST.PID.RANDOM` beside `output`; created with the usual permissions (mkdtemp would give 0700)."""
    path = output.with_name(staging_name(output, tag, os.getpid()))
    if create:
        path.mkdir()
    return path


def staging_name(output: Path, tag: str, pid: int | str) -> str:
    return f".{output.name}.{tag}.{_host()}.{pid}.{secrets.token_hex(4)}"


def _apply_umask(directory: Path) -> None:
    """Gives the files the permissions the user's umask asks for: safetensors writes weights as 0600, which would make
    a converted repository (or a shared conversion cache) unreadable to the user's group."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_staging(output: str | os.PathLike) -> list[Path]:
    """
    Removes the staging folders beside `output` left by conversions on this host whose process is gone (killed with
    SIGKILL, or the machine lost power). A backup of an earlier conversion whose replacement never landed is put back
    in place. Returns what was removed. A folder whose pid now belongs to an unrelated live process is kept: a
    leftover is better than deleting a running conversion's work.
    """
    output = Path(output)
    pattern = re.compile(
        rf"^\.{re.escape(output.name)}\.({_STAGING_TAG}|{_BACKUP_TAG})\.{re.escape(_host())}\.(\d+)\.[0-9a-f]+$"
    )
    removed = []
    if not output.parent.is_dir():
        return removed
    for candidate in output.parent.iterdir():
        match = pattern.match(candidate.name)
        if not match or _process_alive(int(match.group(2))):
            continue
        if match.group(1) == _BACKUP_TAG and not (output.exists() or output.is_symlink()):
            candidate.rename(output)
            continue
        _remove(candidate)
        removed.append(candidate)
    return removed
