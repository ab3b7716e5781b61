"""Reading a checkpoint in the original layout: where it is (directory or hub id) and its tensors, read without
executing code and without reaching outside it."""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..utils import one_line
from .errors import ConversionError

KNOWN_CHECKPOINTS = {
    "nvidia/audio-flamingo-2": "Qwen/Qwen2.5-3B",
    "nvidia/audio-flamingo-2-1.5B": "Qwen/Qwen2.5-1.5B",
    "nvidia/audio-flamingo-2-0.5B": "Qwen/Qwen2.5-0.5B",
    "nvidia/audio-flamingo-2-SoundCoT": "Qwen/Qwen2.5-3B",
}


@dataclass
class OriginalCheckpoint:
    """Tensors of an original-layout checkpoint, by source, with the keys in their original names."""

    safe_ckpt: dict[str, torch.Tensor]
    clap_ckpt: dict[str, torch.Tensor] = field(default_factory=dict)


def is_original_layout(source: str | os.PathLike) -> bool:
    """True for a local directory in the original layout or one of the released hub ids."""
    if str(source) in KNOWN_CHECKPOINTS:
        return True
    return (Path(source) / "safe_ckpt" / "metadata.json").is_file()


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_ORIGINAL_FILES = ["safe_ckpt/*", "clap_ckpt/*", "configs/*"]


def resolve_source(
    source: str | os.PathLike, revision: str | None = None, cache_dir=None, token=None, local_files_only=False
) -> Path:
    """Local directory as is; a hub id is downloaded (only the files conversion needs) or, offline, taken from the
    hub cache. The directory of a hub id is its snapshot, named by the commit."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"SOURCE {source} is a file; expected a checkpoint directory or a hub id.")
    if str(source) not in KNOWN_CHECKPOINTS and not HUB_ID.fullmatch(str(source)):
        raise ConversionError(f"SOURCE {source!r} is neither a local directory nor a hub id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(source),
                revision=revision,
                allow_patterns=_ORIGINAL_FILES,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise ConversionError(
            f"{source}{'@' + revision if revision else ''}: cannot fetch the checkpoint ({one_line(error)[:300]})."
        ) from error


_COMMIT = re.compile(r"[0-9a-f]{40}")


def source_revision(directory: Path) -> str | None:
    """The commit of a snapshot in a hub cache (`models--*/snapshots/<40 hex digits>`, whose files the hub client never
    rewrites), None for any other directory, even one named like it (`x/snapshots/latest` is named by its files)."""
    resolved = Path(directory).resolve()
    snapshots = resolved.parent
    if (
        snapshots.name == "snapshots"
        and snapshots.parent.name.startswith("models--")
        and _COMMIT.fullmatch(resolved.name)
    ):
        return resolved.name
    return None


def load_clap_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Reads `clap_ckpt/*.pt` without executing code from it: `weights_only=True`, with only the numpy scalar types the
    released file needs (its `best_metric` is a numpy float64) added to torch's allow-list.
    """
    _require_file(path, "a CLAP checkpoint (.pt)")
    allowed = [np.dtype, type(np.dtype(np.float64)), _numpy_scalar_reconstructor()]
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error)
        # torch's weights-only unpickler says "Unsupported global: GLOBAL module.name" for a refused callable and
        # "Unsupported operand" for pickle opcodes it does not run; anything else is a damaged file.
        if "Unsupported" in detail:
            raise ConversionError(
                f"{path}: refused to load: the pickle needs something outside the allow-list of tensors and numpy "
                f"scalars, so it may execute code ({_first_line_naming(detail, 'Unsupported')}). Only load "
                "checkpoints you trust, and convert them from the official files."
            ) from error
        raise ConversionError(f"{path}: not a readable checkpoint, the file is truncated or corrupt.") from error
    except (RuntimeError, EOFError, ValueError) as error:  # a cut zip archive, a cut legacy pickle
        raise ConversionError(
            f"{path}: not a readable checkpoint, the file is truncated or corrupt ({str(error).splitlines()[0][:200]}); "
            "download it again."
        ) from error
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise ConversionError(f"{path}: expected a dict with a 'state_dict' entry, as CLAP checkpoints have.")
    return payload["state_dict"]


def _first_line_naming(text: str, word: str) -> str:
    return next((line.strip() for line in text.splitlines() if word in line), text.splitlines()[0])[:300]


def _require_file(path: str | os.PathLike, what: str) -> None:
    """A clear error for a directory or a missing path where `what` (a file) is expected."""
    if os.path.isdir(path):
        raise ConversionError(f"{path} is a directory; expected {what}.")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file; expected {what}.")


def _numpy_scalar_reconstructor():
    core = getattr(np, "_core", None) or np.core
    return core.multiarray.scalar


def read_safe_ckpt(directory: Path) -> dict[str, torch.Tensor]:
    metadata_path = directory / "safe_ckpt" / "metadata.json"
    _require_file(metadata_path, "safe_ckpt/metadata.json (chunk name -> list of keys)")
    try:
        with open(metadata_path) as handle:
            metadata = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{metadata_path}: not valid JSON ({error}); the download may be truncated.") from None
    if not isinstance(metadata, dict) or not all(isinstance(keys, list) for keys in metadata.values()):
        raise ConversionError(f"{metadata_path}: expected a JSON object mapping chunk names to lists of keys.")
    tensors: dict[str, torch.Tensor] = {}
    chunk_of: dict[str, str] = {}
    duplicates: list[str] = []
    for chunk, keys in metadata.items():
        # A chunk is a file name inside safe_ckpt/; anything that could reach outside it is refused, not read.
        if not chunk or chunk in (".", "..") or "/" in chunk or "\\" in chunk or os.path.isabs(chunk):
            raise ConversionError(
                f"{metadata_path} names chunk {chunk!r}; chunk names must be plain file names inside safe_ckpt/."
            )
        chunk_path = directory / "safe_ckpt" / f"{chunk}.safetensors"
        if chunk_path.is_dir():
            raise ConversionError(f"{chunk_path} is a directory; expected a safetensors file.")
        if not chunk_path.is_file():
            raise ConversionError(f"{metadata_path} lists chunk {chunk!r} but {chunk_path} does not exist.")
        try:
            with safe_open(chunk_path, framework="pt") as reader:
                missing = sorted(set(keys) - set(reader.keys()))
                if missing:
                    raise ConversionError(f"{chunk_path} lacks keys that metadata.json lists: {missing[:10]}")
                for key in reader.keys():
                    if key in chunk_of:
                        duplicates.append(f"{key} (in {chunk_of[key]} and {chunk})")
                        continue
                    chunk_of[key] = chunk
                    tensors[key] = reader.get_tensor(key)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(
                f"{chunk_path}: not a readable safetensors file ({error}); the download may be truncated."
            ) from error
    if duplicates:
        # Which copy the original ends up with depends on dict order; guessing could silently pick the wrong one.
        raise ConversionError(f"{len(duplicates)} keys appear in several safe_ckpt chunks: {duplicates[:10]}")
    return tensors


def read_original_checkpoint(directory: Path) -> OriginalCheckpoint:
    safe = read_safe_ckpt(directory)
    clap_files = sorted((directory / "clap_ckpt").glob("*.pt"))
    clap: dict[str, torch.Tensor] = {}
    if len(clap_files) > 1:
        raise ConversionError(f"{directory / 'clap_ckpt'} holds several .pt files {clap_files}; keep the one to use.")
    if clap_files:
        clap = load_clap_pickle(clap_files[0])
    return OriginalCheckpoint(safe_ckpt=safe, clap_ckpt=clap)
