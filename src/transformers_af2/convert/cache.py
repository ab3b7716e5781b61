"""The conversion cache: original-layout checkpoints loaded by id are converted once per content."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from transformers.utils import logging

from ..utils import default_cache_dir
from .checkpoint import convert_checkpoint
from .output import is_af2_conversion
from .source import resolve_source, source_revision

logger = logging.get_logger(__name__)


# Part of every cache key: raise it when a converter change alters what a conversion writes.
CONVERSION_FORMAT = 2


def _content_stamp(value) -> str:
    """What a source or option *is*, not what it is called: a hub snapshot's commit, a file's bytes, a directory's
    files (path, size, mtime); any other value (a hub id of the base model, a dtype) as written."""
    if value is None:
        return "-"
    path = Path(value)
    if path.is_file():
        return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        commit = source_revision(path)
        if commit is not None:
            return f"snapshot:{commit}"
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return f"dir:{path.resolve()}" + "".join(
            f"|{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files
        )
    return f"value:{value}"


def converted_cache_path(source: str | os.PathLike, directory: Path | None = None, **options) -> Path:
    """
    Where the conversion of `source` with `options` (convert_checkpoint's keyword arguments) is cached. The key
    covers the content: the hub commit (or the local files), the bytes of the `config` YAML and of local base-model
    files, the other options, and the converter's format. `directory` is the resolved source when known.
    """
    directory = resolve_source(source) if directory is None else directory
    stamp = {
        "format": CONVERSION_FORMAT,
        "source": str(source),
        "content": _content_stamp(directory),
        "options": {k: _content_stamp(v) for k, v in sorted(options.items()) if v is not None},
    }
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(
        r"[^A-Za-z0-9._-]",
        "_",
        str(source).strip("/").replace("/", "--") if not Path(source).is_dir() else Path(source).resolve().name,
    )
    return default_cache_dir() / f"{name}-{digest}"


def cached_conversion(
    source: str | os.PathLike,
    revision: str | None = None,
    hub_cache_dir=None,
    token=None,
    local_files_only: bool = False,
    **options,
) -> Path:
    """
    The converted repository of `source` (`options`: convert_checkpoint's keyword arguments), converting it on first
    use into the cache (see `converted_cache_path`). A file lock makes concurrent callers, threads or processes,
    convert once: the others wait, then reuse it; nobody sees a half-written folder since a conversion lands by
    rename. `hub_cache_dir` and `token` are for fetching a hub id.
    """
    from filelock import FileLock

    directory = resolve_source(source, revision, hub_cache_dir, token, local_files_only)
    target = converted_cache_path(source, directory, **options)
    if is_af2_conversion(target):
        return target
    # Beside the cache rather than in it, so the cache holds conversions only.
    locks = target.parent.with_name(target.parent.name + ".locks")
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{target.name}.lock"):
        if not is_af2_conversion(target):
            logger.warning(f"Converting {source} from the original layout into {target} (once).")
            hub_kwargs = {"cache_dir": hub_cache_dir, "token": token, "local_files_only": local_files_only}
            hub_kwargs = {k: v for k, v in hub_kwargs.items() if v}
            convert_checkpoint(
                source, target, revision=revision, directory=directory, hub_kwargs=hub_kwargs, **options
            )
    return target
