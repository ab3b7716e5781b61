"""`af2 caption`: caption or label many audio clips into a JSONL/Parquet/CSV file (`caption.api.caption` runs it)."""

from __future__ import annotations

import os

from .options import HelpFormatter, add_device_arguments, add_model_arguments, add_sampling_arguments, positive_int

HELP = "caption or label many audio clips into a JSONL/Parquet/CSV file (resumable, data-parallel)"

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
(generated, eos included), stop_reason (eos or length). Next to OUT: OUT.meta.json (the run's record: model, weights
fingerprint, dtype, generation settings, package versions), OUT.lock (held while a run is on), OUT.errors.jsonl
(clips that could not be read, with the reason; the run goes on) and OUT.parts/ (the rows, appended and fsync'ed per
batch).

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


def add_parser(subparsers) -> None:
    # Here, not at the top: `af2 --help` and the other commands import this module for HELP only.
    from ..caption.api import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS
    from ..caption.inputs import AUDIO_EXTENSIONS

    parser = subparsers.add_parser(
        "caption",
        help=HELP,
        formatter_class=HelpFormatter,
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
        "--max-new-tokens", type=positive_int, metavar="N", help="most tokens per answer (default: the model's)"
    )
    add_sampling_arguments(
        parser, sample_note="; rows then depend on the batches", seed_help="each process adds its rank"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="B", help="rows per generate call"
    )
    parser.add_argument(
        "--lookahead",
        type=positive_int,
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
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..caption.api import caption

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
