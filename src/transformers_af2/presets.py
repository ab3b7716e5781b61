"""
`--fast`: the settings fastest on this machine while keeping the answers of float32 greedy decoding.

Two sources, the first that applies:

1. **Measured here, for this model** (`af2 fast-settings --model M`, `fast_measurement.measure_fast_settings`): each candidate this
   device supports (`candidate_settings`: float32, bfloat16, bfloat16 with int8 or int4 weights) is loaded as the
   commands load it and answers the same clips greedily; a candidate keeps the answers when >= 97% of float32's
   answer tokens are its own at the same positions (`AGREEMENT_RULE`), and `--fast` takes the fastest of those
   (`choose_setting`). The record (`<cache>/fast-settings.json`, the conversion cache: `$AF2_CACHE` or
   `$HF_HOME/transformers_af2`) names the model's files (a hub snapshot's commit, or a local directory's sampled
   file hashes, and the `--config` YAML it is converted with), the machine (device, CPU model, PyTorch, threads) and
   every measurement; another model, changed files or another machine find no record and fall back to the table.
2. **The table per kind of device**, from the benchmarks (`benchmarks/README.md`, "Precision, quantization and
   kernels"):

| device | dtype | CPU linear kernels | why |
|---|---|---|---|
| CUDA | bfloat16 | - | the GPU's native precision |
| CPU with native bf16 dot products (`avx512_bf16` or AMX) | bfloat16 | measured on the machine (`"auto"`) | bf16 tower 1.6x (EPYC) to 2.35x (Xeon AMX) faster; 97.5-100% of fp32's tokens on af2-0.5b (on a random af2-3b, 75%: near-tied logits, every decisive position kept) |
| other CPUs | float32 | measured on the machine (`"auto"`) | bf16 is emulated there (slower than float32) |

The table leaves weight-only int8/int4 (`--quantization`) out: on the benchmarks' random-weight models their top
logits are too close to judge agreement (see the README). With a model's own weights, `af2 fast-settings` judges it,
and `--fast` takes int8 or int4 where they keep the answers and are faster.

An explicit `--dtype` or `--quantization` always wins; a measured quantization is used only with the dtype it was
measured with (`--dtype auto`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

# A candidate keeps the answers when at least this share of float32's greedy answer tokens are its own, position by
# position (the rule for `--fast`).
AGREEMENT_RULE = 0.97
# A less precise candidate is taken only when it is at least this much faster than the best more precise one: one
# measurement is noisy, and a choice that flips between runs would change answers from run to run.
SPEED_MARGIN = 0.95
RECORDS_FILE = "fast-settings.json"
# The CPU feature flags that mean native bfloat16 dot products (elsewhere bfloat16 is emulated, slower than float32).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FastSettings:
    dtype: str  # a name of utils.DTYPE_NAMES
    linear_kernels: str | None  # a setting of modeling.cpu_linear.choose_linear_kernels (None: not CPU)
    reason: str
    quantization: str | None = None  # a name of quantization.QUANTIZATION_NAMES, from a measured record only


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_settings(
    device, flags: set[str] | None = None, model_id=None, cache_dir=None, original_config=None
) -> FastSettings:
    """
    The `--fast` settings for `device` (a `torch.device` or string): the record `af2 fast-settings` measured for
    `model_id` (loaded with `original_config`, `--config`) on this machine, if there is one, else the table above
    (`flags`: the CPU's, default this one's).
    """
    import torch

    device = torch.device(device)
    kernels = "auto" if device.type == "cpu" else None
    if model_id is not None:
        record = measured_record(model_id, device, cache_dir, original_config)
        if record is not None:
            choice = record["choice"]
            return FastSettings(
                choice["dtype"], kernels, f"measured for this model on this machine ({record['measured']})",
                choice["quantization"],
            )  # fmt: skip
    if device.type != "cpu":
        return FastSettings("bfloat16", None, "accelerator: bfloat16")
    flags = cpu_flags() if flags is None else flags
    native_bf16 = sorted(flags & NATIVE_BF16_FLAGS)
    if native_bf16:
        return FastSettings("bfloat16", "auto", f"CPU with {' and '.join(native_bf16)}: bfloat16, measured kernels")
    return FastSettings("float32", "auto", "CPU without native bfloat16: float32, measured kernels")


# ---------------------------------------------------------------------------------------------------------------------
# measured records
# ---------------------------------------------------------------------------------------------------------------------


def parse_setting(text: str) -> tuple[str, str | None]:
    """`"DTYPE"` or `"DTYPE+SCHEME"` (e.g. `bfloat16+int8`) as `(dtype, scheme or None)`; a ValueError otherwise."""
    from .quantization import QUANTIZATION_NAMES
    from .utils import DTYPE_NAMES

    dtype, _, scheme = text.partition("+")
    if dtype not in DTYPE_NAMES or (scheme and scheme not in QUANTIZATION_NAMES):
        raise ValueError(
            f"setting {text!r}: write DTYPE or DTYPE+SCHEME, DTYPE one of {', '.join(DTYPE_NAMES)}, SCHEME one of "
            f"{', '.join(QUANTIZATION_NAMES)}"
        )
    return dtype, scheme or None


def setting_name(dtype: str, scheme: str | None) -> str:
    return f"{dtype}+{scheme}" if scheme else dtype


def candidate_settings(
    device, flags: set[str] | None = None, quantizable: bool = True
) -> list[tuple[str, str | None]]:
    """
    What `af2 fast-settings` measures on `device`, most precise first: float32 (the reference), then bfloat16 where
    it is native (GPUs; CPUs with avx512_bf16 or AMX), then, for a `quantizable` model (AF2) with torchao installed,
    bfloat16 with int8 weights (PyTorch's int8 kernel on CPU) and with int4 weights (where torchao has a kernel for the
    device). float16 and bitsandbytes are not measured by default (slower on CPU; give them with `--candidates`).
    """
    import importlib.util

    import torch

    device = torch.device(device)
    flags = cpu_flags() if flags is None else flags
    if device.type == "cpu" and not flags & NATIVE_BF16_FLAGS:
        return [("float32", None)]  # bfloat16 is emulated there, and the int8/int4 kernels take bfloat16
    settings = [("float32", None), ("bfloat16", None)]
    if quantizable and importlib.util.find_spec("torchao") is not None:
        from .quantization import int4_cpu_kernel_available

        settings.append(("bfloat16", "int8"))
        if device.type != "cpu" or int4_cpu_kernel_available():
            settings.append(("bfloat16", "int4"))
    return settings


# The CPU features a measurement depends on beyond the model name (which can be as vague as "AMD EPYC").
_CPU_FEATURES = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}


def model_files_identity(model_id, original_config=None) -> dict | None:
    """
    What names a model's files in a record: a hub snapshot's commit (a hub id in the local hub cache, or a snapshot
    directory of a hub cache), or the sampled hashes of a local directory's weight, config and tokenizer files
    (`runstore.model_directory_files`), and the `--config` YAML it is loaded with (`original_config`). None for a hub
    id not in the local cache (it was never measured here), for a path that does not exist and a YAML that cannot be
    read.
    """
    from .convert.source import source_revision
    from .runstore import model_directory_files, original_config_identity

    try:
        with_config = original_config_identity(original_config)
    except OSError:  # not there, a directory, unreadable: the loading that follows says which
        return None
    path = Path(os.path.expanduser(str(model_id)))
    if path.is_dir():
        commit = source_revision(path)
        files = {"hub_revision": commit} if commit else {"files": model_directory_files(path)}
        return {**files, **with_config}
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(str(model_id), local_files_only=True)
    except (HFValidationError, LocalEntryNotFoundError, OSError):
        return None
    return {"hub_revision": Path(snapshot).name, **with_config}


def machine_identity(device) -> dict:
    """The device, CPU model and features, PyTorch version and thread count a measurement holds for."""
    import torch

    from .modeling.cpu_linear import cpu_model_name

    device = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu": cpu_model_name(),
        "cpu_features": sorted(cpu_flags() & _CPU_FEATURES),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _records_path(cache_dir) -> Path:
    if cache_dir is None:
        from .utils import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir) / RECORDS_FILE


class UnreadableRecords(ValueError):
    """The records file exists but is not one `af2 fast-settings` wrote (not JSON, or not a list of records)."""


def _valid_record(record) -> bool:
    from .quantization import QUANTIZATION_NAMES
    from .utils import DTYPE_NAMES

    if not isinstance(record, dict):
        return False
    choice = record.get("choice")
    return (
        isinstance(record.get("model"), dict)
        and isinstance(record.get("machine"), dict)
        and isinstance(record.get("measured"), str)
        and isinstance(choice, dict)
        and choice.get("dtype") in DTYPE_NAMES
        and (choice.get("quantization") is None or choice.get("quantization") in QUANTIZATION_NAMES)
    )


def _read_records(path: Path) -> list[dict]:
    """The records of `path` ([] when it does not exist), leaving out, with a warning naming the file, entries that
    are not records (hand-edited: an unknown dtype or scheme, a missing field). `UnreadableRecords` when the file
    itself is not a records file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableRecords(f"{path}: cannot be read ({error})") from None
    try:
        records = json.loads(text).get("records")
    except (ValueError, AttributeError):
        records = None
    if not isinstance(records, list):
        raise UnreadableRecords(f'{path}: not a file of --fast records (a JSON object with a "records" list)')
    valid = [record for record in records if _valid_record(record)]
    if len(valid) < len(records):
        logger.warning("%s: %d of its %d entries are not --fast records; left out", path, len(records) - len(valid),
                       len(records))  # fmt: skip
    return valid


def measured_record(model_id, device, cache_dir=None, original_config=None) -> dict | None:
    """The record `af2 fast-settings` wrote for `model_id`'s files (with `original_config`, `--config`) on this
    machine, or None (also, with a warning naming it, when the records file is unreadable: `--fast` then takes the
    device table)."""
    path = _records_path(cache_dir)
    if not path.is_file():
        return None
    identity = model_files_identity(model_id, original_config)
    if identity is None:
        return None
    try:
        records = _read_records(path)
    except UnreadableRecords as error:
        logger.warning("%s; --fast takes the settings of its device table. Run af2 fast-settings again to replace it.",
                       error)  # fmt: skip
        return None
    machine = machine_identity(device)
    return next((r for r in records if r["model"] == identity and r["machine"] == machine), None)


def write_record(record: dict, cache_dir=None) -> Path:
    """
    Adds `record` to the records file, replacing an earlier one for the same model files and machine. The read,
    change and write happen under a lock (`<file>.lock`), so that measurements finishing together keep each other's
    records; the file is replaced atomically. A file that is not a records file is kept, renamed
    `<file>.unreadable-<time>`, with a warning, and a new one started.
    """
    import fcntl
    import time

    from .runstore import write_json_atomically

    path = _records_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            records = _read_records(path)
        except UnreadableRecords as error:
            kept = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, kept)
            logger.warning("%s; kept as %s, and a new records file started", error, kept)
            records = []
        key = (record["model"], record["machine"])
        records = [r for r in records if (r["model"], r["machine"]) != key]
        write_json_atomically(path, {"records": [*records, record]})
    return path


def choose_setting(measurements: list[dict], rule: float = AGREEMENT_RULE, margin: float = SPEED_MARGIN) -> dict:
    """
    The measurement `--fast` takes: of those whose token agreement with float32 is at least `rule` (the reference,
    first, always is), the fastest by `seconds` (the time of the reference answers), a less precise one only when
    it is faster than the best before it by the factor `margin`. `measurements` are ordered most precise first.
    """
    best = measurements[0]
    for entry in measurements[1:]:
        if entry["agreement"]["tokens"] >= rule and entry["seconds"] < margin * best["seconds"]:
            best = entry
    return best


__all__ = [
    "AGREEMENT_RULE",
    "FastSettings",
    "UnreadableRecords",
    "candidate_settings",
    "choose_setting",
    "cpu_flags",
    "fast_settings",
    "measured_record",
    "parse_setting",
    "setting_name",
    "write_record",
]
