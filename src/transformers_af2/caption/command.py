"""`af2 caption` and `caption()`: answer prompts about many clips into a JSONL/Parquet/CSV file, resumably and on
many processes."""

from __future__ import annotations

import argparse
import os

from ..runstore import RunStore, model_fingerprint, package_versions
from .engine import ProcessGroup, RunSummary, jobs_for_clips, run_generation_jobs
from .inputs import AUDIO_EXTENSIONS, DatasetAudio, discover_clips

DEFAULT_BATCH_SIZE = 8
DEFAULT_NUM_WORKERS = 2


def generation_settings(model, max_new_tokens=None, do_sample=False, top_k=None, top_p=None, temperature=None):
    """The `generate` arguments of a run, with the model's defaults filled in so the sidecar says what was used."""
    from ..cli import DEFAULT_TOP_K, DEFAULT_TOP_P
    from ..families import family_class

    if not do_sample and any(v is not None for v in (top_k, top_p, temperature)):
        raise ValueError("top_k, top_p and temperature (--top-k, --top-p, --temperature) apply to sampling only.")
    settings = {
        "max_new_tokens": max_new_tokens or family_class(model.config.model_type).default_max_new_tokens(model),
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
    fast: bool = False,
    quantization: str | None = None,
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
    overwrite: bool = False,
) -> RunSummary:
    """
    Answers every prompt about every clip of `inputs` and writes one row per (clip, prompt) to `output`.

    Run it again with the same arguments after an interruption (even kill -9) and it continues where it stopped;
    with more inputs or prompts and it adds their rows. Under `torchrun` or `accelerate launch` each process takes
    its share of the clips. See `af2 caption --help` for the inputs, the row fields and the files next to `output`.

    Args:
        inputs: a path or a list of them: audio files, folders, `.txt` lists, CSV/TSV/JSONL/Parquet manifests,
            saved `datasets` folders (or, with `dataset=True`, anything `datasets.load_dataset` takes).
        output: `.jsonl` (default), `.parquet` or `.csv`. It must be af2's: a file af2 did not write (or that was
            changed since), an input of the run or a folder is refused; a second run into it while one is on is
            refused; a resume with another model, dtype, settings or versions is refused (see `runstore`).
        overwrite: start anew, replacing whatever is at `output` (never an input of the run).
        prompts: the questions asked about every clip (a clip with its own manifest prompt is asked that one).
        model: model id or directory (see `load_model_and_processor`), or a loaded AF2 model with `processor`.
        dtype, device: as in `af2 generate` (`auto`: bfloat16 on GPU, float32 on CPU); under torchrun "auto" and
            "cuda" mean the process's own GPU, `cuda:LOCAL_RANK`.
        fast, quantization: as `af2 generate --fast` / `--quantization` (`cli.model_loading_options`); the
            quantization is part of the run's recorded model.
        Others: see `af2 caption --help`.

    Returns:
        `RunSummary`: rows done, failed and skipped as already done (over all processes).
    """
    import torch

    from ..cli import _resolve_device, load_model_and_processor, model_loading_options
    from ..utils import set_seed

    with ProcessGroup() as processes:
        inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        blank = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if blank:
            raise ValueError(f"--prompt {blank[0]!r}: a prompt must hold a question (af2 generate refuses it too).")
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
            resolved_device = _resolve_device(device)
            if resolved_device.type == "cuda" and resolved_device.index is None and processes.world_size > 1:
                resolved_device = torch.device("cuda", processes.local_rank)  # one GPU per process of the node
            model, processor = load_model_and_processor(
                model_id,
                device=resolved_device,
                original_config=config,
                **model_loading_options(resolved_device, dtype, fast, quantization),
            )
        else:
            if processor is None:
                raise ValueError("caption(model=<loaded model>) needs its processor too: pass processor=.")
            model_id = model.name_or_path
        generate_kwargs = generation_settings(model, max_new_tokens, do_sample, top_k, top_p, temperature)
        # A directory is recorded by its resolved path, so that a rerun from another folder matches.
        settings = {"model": model_fingerprint(model, model_id), "generation": generate_kwargs}
        if do_sample and seed is not None:
            settings["seed"] = seed
        if seed is not None:
            set_seed(seed + processes.rank)
        # Every file the run reads, so that the output can never be one of them.
        read = [str(i) for i in inputs if os.path.isfile(os.path.expanduser(str(i)))]
        read += [clip.audio for clip in clips if not isinstance(clip.audio, DatasetAudio)]
        store = RunStore(output, inputs=read, overwrite=overwrite)
        return run_generation_jobs(
            jobs,
            model,
            processor,
            store,
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
Answer one or more prompts about many audio clips with Audio Flamingo 2, Audio Flamingo 3 or Music Flamingo (the
family is read from the model's config.json) and write one row per (clip, prompt).

INPUT is any mix of: audio files; folders (searched recursively by --extensions); .txt/.lst lists of paths (one per
line, relative to the list's folder); CSV/TSV/JSONL/Parquet manifests with a path column (path, audio_path, audio,
file, filename or filepath; or --path-column), optionally an id column (id) and a prompt column (prompt: that row
is asked its own prompt); folders saved by `datasets` (save_to_disk), or with --dataset any `datasets.load_dataset`
source (--split, --audio-column).

OUT is JSONL, or Parquet / CSV by extension. Row fields: id (stable: a hash of clip id and prompt), clip_id (the
manifest id, the path, or DATASET[SPLIT]#INDEX), path, index (row of the dataset or manifest), prompt, answer,
windows (windows read: AF2 10 s, AF3 / Music Flamingo 30 s), seconds_dropped (audio past the last window), tokens
(generated, eos included), stop_reason (eos or length). Next to OUT: OUT.meta.json (the run's record: model, weights fingerprint, dtype,
generation settings, package versions), OUT.lock (held while a run is on), OUT.errors.jsonl (clips that could not
be read, with the reason; the run goes on) and OUT.parts/ (the rows, appended and fsync'ed per batch).

Safety: af2 replaces only what it wrote. OUT that af2 did not write (or that was changed since), an input of the
run, or a folder is refused (--overwrite starts anew). A second run into OUT while one is on is refused, naming it.
A resume with another model, weights, dtype, generation settings or package versions is refused, naming each
difference; a stored row is reused only if its clip is the same file, unchanged (size and mtime).

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
    add_model_arguments(parser, speed_options=True)
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start anew: replace OUT and its files even if af2 did not write them (never an input of the run)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else a line per 5%%)")
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
            fast=args.fast,
            quantization=args.quantization,
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
            overwrite=args.overwrite,
        )
    except ImportError as error:  # an optional dependency (pyarrow, datasets): the message says what to install
        raise RuntimeError(str(error)) from error
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"af2 caption: {summary.line()}")
    return 0
