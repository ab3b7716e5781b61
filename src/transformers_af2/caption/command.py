"""`af2 caption` and `caption()`: answer prompts about many clips into a JSONL/Parquet/CSV file, resumably and on
many processes."""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from .engine import ProcessGroup, RunSummary, jobs_for_clips, package_versions, run_generation_jobs
from .inputs import AUDIO_EXTENSIONS, discover_clips

DEFAULT_BATCH_SIZE = 8
DEFAULT_NUM_WORKERS = 2


def model_revision(model, model_id: str) -> str | None:
    """
    What identifies the weights: the hub commit when they came from the hub, else for a local directory a digest of
    its config and of each weight file's size, head and tail (cheap, and changes when the weights are replaced).
    """
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    directory = Path(os.path.expanduser(str(model_id)))
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or path.suffix == ".safetensors":
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
    return "local-sha256:" + digest.hexdigest()[:16]


def generation_settings(model, max_new_tokens=None, do_sample=False, top_k=None, top_p=None, temperature=None):
    """The `generate` arguments of a run, with the model's defaults filled in so the sidecar says what was used."""
    from ..cli import DEFAULT_TOP_K, DEFAULT_TOP_P

    if not do_sample and any(v is not None for v in (top_k, top_p, temperature)):
        raise ValueError("top_k, top_p and temperature (--top-k, --top-p, --temperature) apply to sampling only.")
    settings = {
        "max_new_tokens": max_new_tokens or model.generation_config.max_new_tokens,
        "do_sample": bool(do_sample),
        "num_beams": 1,
    }
    if do_sample:
        settings.update(top_k=top_k or DEFAULT_TOP_K, top_p=DEFAULT_TOP_P if top_p is None else top_p)
        if temperature is not None:
            settings["temperature"] = temperature
    return settings


def caption(
    inputs,
    output: str | os.PathLike,
    *,
    prompts: list[str] | str | None = None,
    model="nvidia/audio-flamingo-2",
    processor=None,
    config: str | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    num_workers: int = DEFAULT_NUM_WORKERS,
    lookahead: int | None = None,
    progress: bool | None = None,
    dataset: bool = False,
    split: str | None = None,
    audio_column: str = "audio",
    path_column: str | None = None,
    id_column: str | None = None,
    prompt_column: str | None = None,
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
) -> RunSummary:
    """
    Answers every prompt about every clip of `inputs` and writes one row per (clip, prompt) to `output`.

    Run it again with the same arguments after an interruption (even kill -9) and it continues where it stopped;
    with more inputs or prompts and it adds their rows. Under `torchrun` or `accelerate launch` each process takes
    its share of the clips. See `af2 caption --help` for the inputs, the row fields and the files next to `output`.

    Args:
        inputs: a path or a list of them: audio files, folders, `.txt` lists, CSV/TSV/JSONL/Parquet manifests,
            saved `datasets` folders (or, with `dataset=True`, anything `datasets.load_dataset` takes).
        output: `.jsonl` (default), `.parquet` or `.csv`.
        prompts: the questions asked about every clip (a clip with its own manifest prompt is asked that one).
        model: model id or directory (see `load_model_and_processor`), or a loaded AF2 model with `processor`.
        dtype, device: as in `af2 generate` (`auto`: bfloat16 on GPU, float32 on CPU); under torchrun "auto" and
            "cuda" mean the process's own GPU, `cuda:LOCAL_RANK`.
        Others: see `af2 caption --help`.

    Returns:
        `RunSummary`: rows done, failed and skipped as already done (over all processes).
    """
    import torch

    from ..cli import _resolve_device, load_model_and_processor
    from ..utils import parse_dtype, set_seed

    with ProcessGroup() as processes:
        inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        clips = discover_clips(
            inputs,
            extensions=extensions,
            dataset=dataset,
            split=split,
            audio_column=audio_column,
            path_column=path_column,
            id_column=id_column,
            prompt_column=prompt_column,
        )
        if not clips:
            raise ValueError(f"no clips found in {[str(i) for i in inputs]}.")
        jobs = jobs_for_clips(clips, prompts)

        if isinstance(model, (str, os.PathLike)):
            model_id = str(model)
            local = os.path.expanduser(model_id)
            # A directory is recorded by its absolute path, so that a rerun from another folder matches.
            recorded_id = os.path.abspath(local) if os.path.isdir(local) else model_id
            resolved_device = _resolve_device(device)
            if resolved_device.type == "cuda" and resolved_device.index is None and processes.world_size > 1:
                resolved_device = torch.device("cuda", processes.local_rank)  # one GPU per process of the node
            model, processor = load_model_and_processor(
                model_id,
                device=resolved_device,
                dtype=parse_dtype(dtype, resolved_device),
                original_config=config,
            )
        else:
            if processor is None:
                raise ValueError("caption(model=<loaded model>) needs its processor too: pass processor=.")
            model_id = recorded_id = model.name_or_path
        generate_kwargs = generation_settings(model, max_new_tokens, do_sample, top_k, top_p, temperature)
        settings = {
            "model": recorded_id,
            "revision": model_revision(model, model_id),
            "dtype": str(model.dtype).removeprefix("torch."),
            "generation": generate_kwargs,
        }
        if do_sample and seed is not None:
            settings["seed"] = seed
        if seed is not None:
            set_seed(seed + processes.rank)
        return run_generation_jobs(
            jobs,
            model,
            processor,
            output,
            settings=settings,
            versions=package_versions(),
            generate_kwargs=generate_kwargs,
            batch_size=batch_size,
            lookahead=lookahead,
            num_workers=num_workers,
            progress=progress,
            processes=processes,
        )


# ---------------------------------------------------------------------------------------------------------------------
# af2 caption
# ---------------------------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Answer one or more prompts about many audio clips with Audio Flamingo 2 and write one row per (clip, prompt).

INPUT is any mix of: audio files; folders (searched recursively by --extensions); .txt/.lst lists of paths (one per
line, relative to the list's folder); CSV/TSV/JSONL/Parquet manifests with a path column (path, audio_path, audio,
file, filename or filepath; or --path-column), optionally an id column (id) and a prompt column (prompt: that row
is asked its own prompt); folders saved by `datasets` (save_to_disk), or with --dataset any `datasets.load_dataset`
source (--split, --audio-column).

OUT is JSONL, or Parquet / CSV by extension. Row fields: id (stable: a hash of clip id and prompt), clip_id (the
manifest id, the path, or DATASET[SPLIT]#INDEX), path, index (row of the dataset or manifest), prompt, answer,
windows (10 s windows read), seconds_dropped (audio past the last window), tokens (generated, eos included),
stop_reason (eos or length). Next to OUT: OUT.meta.json (model, revision, dtype, generation settings, package
versions; another run into OUT with other settings is an error), OUT.errors.jsonl (clips that could not be read,
with the reason; the run goes on) and OUT.parts/ (the rows, appended and fsync'ed per batch).

Resume: run the same command again, after any interruption (kill -9 included): rows already in OUT.parts are
skipped. Data-parallel: start the same command under torchrun or accelerate launch; each process takes the clips
whose id hashes to its rank and rank 0 merges (any number of processes can resume any other's run).

examples:
  af2 caption clips/ --model af2-3b-hf --prompt "Describe the audio." --output captions.jsonl
  af2 caption manifest.csv --prompt "What is the genre?" --prompt "What instruments play?" -o music.parquet
  af2 caption ./my_dataset --split test --audio-column audio -o test.csv --dtype bfloat16 --batch-size 16
  torchrun --nproc-per-node 8 -m transformers_af2 caption clips/ --prompt "Describe the audio." -o captions.jsonl
  accelerate launch -m transformers_af2 caption clips/ --prompt "Describe the audio." -o captions.jsonl"""


def add_caption_parser(subparsers, formatter_class=argparse.RawDescriptionHelpFormatter) -> None:
    from ..cli import DEFAULT_TOP_K, DEFAULT_TOP_P, _positive_int, add_device_arguments, add_model_arguments

    parser = subparsers.add_parser(
        "caption",
        help="caption or label many audio clips into a JSONL/Parquet/CSV file (resumable, data-parallel)",
        formatter_class=formatter_class,
        description=DESCRIPTION,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders, lists, manifests, datasets")
    parser.add_argument("--output", "-o", required=True, metavar="OUT", help="output file: .jsonl, .parquet or .csv")
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="a question asked about every clip; repeat for several (one row each)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", help="most tokens per answer (default: the model's)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sample",
        dest="do_sample",
        action="store_true",
        default=False,
        help=f"sample (top-k {DEFAULT_TOP_K}, top-p {DEFAULT_TOP_P} unless set); rows then depend on the batches",
    )
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (the default)")
    parser.add_argument("--top-k", type=_positive_int, metavar="K", help="with --sample")
    parser.add_argument("--top-p", type=float, metavar="P", help="with --sample")
    parser.add_argument("--temperature", type=float, metavar="T", help="with --sample")
    parser.add_argument("--seed", type=int, help="random seed (each process adds its rank)")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, metavar="B", help="rows per generate call"
    )
    parser.add_argument(
        "--lookahead",
        type=_positive_int,
        metavar="N",
        help="rows read ahead and grouped by length before generating (default: max(64, 8 x batch size))",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=DEFAULT_NUM_WORKERS,
        metavar="W",
        help="processes reading and resampling audio while the model runs (0: in the main process)",
    )
    add_device_arguments(parser)
    data = parser.add_argument_group("inputs")
    data.add_argument("--dataset", action="store_true", help="INPUTs are `datasets.load_dataset` sources (hub ids)")
    data.add_argument("--split", help="dataset split (needed when the dataset has several)")
    data.add_argument("--audio-column", default="audio", help="dataset column with the audio")
    data.add_argument("--path-column", help="manifest column with the audio path (default: found by name)")
    data.add_argument("--id-column", help="manifest/dataset column with the clip id (default: 'id' if present)")
    data.add_argument("--prompt-column", help="manifest/dataset column with a per-row prompt (default: 'prompt')")
    data.add_argument(
        "--extensions",
        default=",".join(e.lstrip(".") for e in AUDIO_EXTENSIONS),
        help="audio file extensions searched in folders, comma-separated",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it shows only on a terminal anyway)")
    parser.set_defaults(handler=run_caption_command)


def run_caption_command(args) -> int:
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {args.num_workers}.")
    try:
        summary = caption(
            args.inputs,
            args.output,
            prompts=args.prompt,
            model=args.model,
            config=args.config,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            num_workers=args.num_workers,
            lookahead=args.lookahead,
            progress=False if args.quiet else None,
            dataset=args.dataset,
            split=args.split,
            audio_column=args.audio_column,
            path_column=args.path_column,
            id_column=args.id_column,
            prompt_column=args.prompt_column,
            extensions=tuple(e.strip() for e in args.extensions.split(",") if e.strip()),
        )
    except ImportError as error:  # an optional dependency (pyarrow, datasets): the message says what to install
        raise RuntimeError(str(error)) from error
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"af2 caption: {summary.line()}")
    return 0
