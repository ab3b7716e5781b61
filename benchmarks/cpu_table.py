#!/usr/bin/env python
"""AF2 at the limit of a CPU: one table of precision and weight-only quantization per model shape, in one run.

For each `--shapes` entry (random weights, saved once in float32) and each `--variants` entry (`DTYPE` or
`DTYPE+SCHEME`, loaded from that checkpoint as `--dtype`/`--quantization` do), a fresh process (so that the peak RSS
is the variant's own) measures, in this order:

- load time (`from_pretrained`, quantization included) and, at the end, the peak RSS of the process;
- agreement with float32 (`quantization_benchmark.py`'s columns: greedy tokens, identical answers, teacher-forced
  tokens, relative logit error, teacher-forced agreement where float32's margin exceeds k x the logit-error std);
  the float32 process writes its answers and logits for the others, so float32 must come first to have them;
- the decoding step with 10 s of audio on the model's cache (median of `--repeats` runs of `--steps` steps) and
  tokens/s;
- the prefill with 10 s and with 120 s of audio;
- caption throughput: `af2 caption`'s engine (`transformers_af2.caption.caption`, batches of `--batch-size`) over
  mixed-length noise clips (3-120 s), clips/s, the count per shape from `--caption-clips`;
- the bare-LM floor: the Qwen2 language model alone (no cross-attention), same dtype and, for torchao schemes, the
  same quantization of its linears (head excepted), decoding step on its cache.

Writes the JSON and the Markdown table (`--out-dir`, default benchmarks/results/) and prints the table.

    python benchmarks/cpu_table.py --threads 2    # af2-0.5b and af2-3b, ~37 min on a quiet 2-core machine
    python benchmarks/cpu_table.py --quick        # tiny shape, few tokens: seconds

Random weights: the agreement columns are a lower bound (near-tied logits); the logit error and the restricted
agreement are the measure that does not need trained weights (benchmarks/README.md says what they show).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from caption_benchmark import caption_rows, suppress_control_tokens, word_level_processor, write_clips
from items import decode_step_time
from measurement import log, machine_description, own_cpu_seconds, peak_rss_bytes, recording_timer, write_json
from quantization_benchmark import (
    AGREEMENT_HEADER,
    add_margin_argument,
    agreement,
    agreement_cells,
    greedy_answers,
    load_variant,
    logit_fidelity,
    parse_variant,
    teacher_forced,
)
from shapes import audio_features, bare_language_model, build_random_model, prompts

from transformers_af2.quantization import quantization_config, use_int8_cpu_kernel
from transformers_af2.utils import parse_dtype

RESULTS = Path(__file__).resolve().with_name("results")
VARIANTS = ["float32", "bfloat16", "bfloat16+int8", "bfloat16+int4"]
QUICK_VARIANTS = ["float32", "bfloat16+int4"]
LIBRARY = {"int8": "torchao", "int4": "torchao", "bnb-8bit": "bitsandbytes", "bnb-4bit": "bitsandbytes"}
# Caption clips per shape: the 40 for af2-0.5b (about 15 of the full run's ~37 min on a quiet 2-core machine);
# af2-3b's decoding step is ~6x af2-0.5b's and its other items take ~13 min, so 6 clips (~4 min) keep the run near
# 35 min (`--caption-clips af2-3b=40` for the count, about 25 min more; benchmarks/README.md has the estimate).
CAPTION_CLIPS = {"af2-0.5b": 40, "af2-3b": 6, "tiny": 3}
PROMPT_TOKENS = 16


def variant_name(dtype: str, scheme: str | None) -> str:
    return dtype + (f"+{scheme}" if scheme else "")


def missing_library(scheme: str | None) -> str | None:
    if scheme and importlib.util.find_spec(LIBRARY[scheme]) is None:
        return LIBRARY[scheme]
    return None


def bare_lm_floor(timer, args, config, dtype, scheme) -> dict:
    """Decode step of the bare Qwen2 LM of `config` in `dtype`, its linears quantized like the variant's (torchao
    schemes; the tied head excepted, as in AF2) and, for int8, taking the same CPU kernel (`use_int8_cpu_kernel`,
    which AF2's `from_pretrained` applies)."""
    lm = bare_language_model(config, dtype, torch.device("cpu"))
    quantized = False
    if scheme and LIBRARY[scheme] == "torchao":
        from torchao.quantization import quantize_

        quantize_(
            lm,
            quantization_config(scheme, dtype=dtype).quant_type,
            filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head",
        )
        use_int8_cpu_kernel(lm)
        quantized = True
    ids, mask = prompts([PROMPT_TOKENS], config, torch.device("cpu"))
    with torch.inference_mode():
        step = decode_step_time(timer, lm, torch.device("cpu"), args, ids, mask)
    del lm
    gc.collect()
    return {**step, "quantized": quantized}


def child(args) -> None:
    """One variant of one saved checkpoint, in this fresh process; prints `CHILD_RESULT {json}` (with the wall time
    of each phase, to see where a run's time goes)."""
    timer = dataclasses.replace(recording_timer(args), warmup=args.warmup)
    # The prefill's code paths are warm by then (the agreement check and the decode step prefill 10 s or more).
    unwarmed = dataclasses.replace(timer, warmup=0)
    # Wall and CPU seconds of each phase: on a loaded machine the CPU seconds / threads tell what a quiet one takes.
    phases, mark = {}, (time.perf_counter(), own_cpu_seconds())

    def phase_done(name):
        nonlocal mark
        now = (time.perf_counter(), own_cpu_seconds())
        phases[name] = {"wall_s": now[0] - mark[0], "cpu_s": now[1] - mark[1]}
        mark = now

    dtype_name, scheme = args.child
    model, load = load_variant(args.checkpoint, dtype_name, scheme)
    dtype = parse_dtype(dtype_name)
    device = torch.device("cpu")
    result = {"load_s": load["load_s"], "phase_seconds": phases}
    phase_done("load")
    reference_path = Path(args.reference)
    with torch.inference_mode():
        log(f"{args.label}: greedy answers and teacher-forced logits")
        answers = greedy_answers(model, args.clips, args.new_tokens, dtype)
        result["answers"] = answers
        if dtype_name == "float32" and scheme is None:
            forced = teacher_forced(model, answers, dtype)
            reference = {"answers": answers, "logits": forced["logits"]}
            torch.save(reference, reference_path)
        elif reference_path.exists():
            reference = torch.load(reference_path, weights_only=True)
            forced = teacher_forced(model, reference["answers"], dtype)
        else:
            reference = None
        if reference is not None:
            result["agreement_with_float32"] = {
                **agreement(answers, reference["answers"]),
                "teacher_forced_tokens": agreement(forced["picks"], reference["answers"])["tokens"],
            }
            result["teacher_forced"] = {
                "median_top2_margin_in_std": forced["median_top2_margin_in_std"],
                "fidelity": logit_fidelity(forced["logits"], reference["logits"], args.margin_k),
            }
        phase_done("agreement")
        ids, mask = prompts([PROMPT_TOKENS], model.config, device)
        audio = {}
        for seconds in (10, 120):
            features, features_mask = audio_features([seconds], device)
            audio[seconds] = dict(input_features=features.to(dtype), input_features_mask=features_mask)
        log(f"{args.label}: decode step, 10 s of audio")
        result["decode_step_s"] = decode_step_time(timer, model, device, args, ids, mask, **audio[10])
        phase_done("decode_step")
        for seconds, inputs in audio.items():
            log(f"{args.label}: prefill, {seconds} s of audio")

            def prefill(model=model, inputs=inputs):
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **inputs)

            result[f"prefill_{seconds}s_s"] = unwarmed.measure(prefill, device)
            phase_done(f"prefill_{seconds}s")
    clips = len(list(Path(args.clip_dir).glob("*.wav")))
    if clips:
        log(f"{args.label}: af2 caption over {clips} clips")
        model.generation_config.max_new_tokens = args.caption_tokens
        suppress_control_tokens(model)
        processor = word_level_processor(model.config)
        start = time.perf_counter()
        rows = caption_rows(args.clip_dir, model, processor, args.caption_tokens, args.batch_size, num_workers=1)
        seconds = time.perf_counter() - start
        result["caption"] = {"clips": len(rows), "seconds": seconds, "clips_per_s": len(rows) / seconds}
        phase_done("caption")
    result["peak_rss_bytes"] = peak_rss_bytes()
    config = model.config
    del model
    gc.collect()
    log(f"{args.label}: bare-LM floor")
    result["bare_lm_decode_step_s"] = bare_lm_floor(timer, args, config, dtype, scheme)
    phase_done("bare_lm_floor")
    print("CHILD_RESULT " + json.dumps(result), flush=True)


def run_child(args, checkpoint: Path, variant, clip_dir: Path, reference: Path, label: str) -> dict:
    dtype, scheme = variant
    command = [
        sys.executable, __file__, "--child", variant_name(dtype, scheme), "--checkpoint", str(checkpoint),
        "--clip-dir", str(clip_dir), "--reference", str(reference), "--label", label,
        "--threads", str(args.threads), "--repeats", str(args.repeats), "--steps", str(args.steps),
        "--clips", str(args.clips), "--new-tokens", str(args.new_tokens), "--margin-k", str(args.margin_k),
        "--caption-tokens", str(args.caption_tokens), "--batch-size", str(args.batch_size),
        "--warmup", str(args.warmup),
    ]  # fmt: skip
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its log goes to our stderr
    for line in completed.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT ") :])
    # The other variants and shapes still run (an af2-3b float32 process can run out of memory on a small machine).
    log(f"{label} failed (exit {completed.returncode}): {' '.join(command)}")
    return {"failed": f"exit {completed.returncode}, see the log"}


def caption_note(shape: str, results) -> str:
    """Says so where a full shape's caption count is not the issue's 40 clips."""
    count = results["shapes"][shape]["caption_clips"]
    return f" (the issue's table: 40; {count} here)" if shape.startswith("af2-") and count != 40 else ""


def format_table(results) -> str:
    lines = [
        "| shape | variant | decode step (10 s audio) | tokens/s | bare-LM floor step | prefill 10 s | prefill 120 s | "
        f"peak RSS | load | caption (clips/s) | {AGREEMENT_HEADER} | others' cores (decode) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, entry in results["shapes"].items():
        for name, e in entry["variants"].items():
            if "skipped" in e or "failed" in e:
                reason = f"skipped: {e['skipped']}" if "skipped" in e else f"failed: {e['failed']}"
                lines.append(f"| {shape} | {name} | {reason} |" + " |" * 11)
                continue
            floor = e["bare_lm_decode_step_s"]
            caption = e.get("caption")
            caption_text = f"{caption['clips_per_s']:.3f} ({caption['clips']} clips)" if caption else "-"
            lines.append(
                f"| {shape} | {name} | {e['decode_step_s']['median'] * 1e3:.1f} ms | "
                f"{1 / e['decode_step_s']['median']:.2f} | {floor['median'] * 1e3:.1f} ms"
                f"{'' if floor['quantized'] or '+' not in name else ' (unquantized)'} | "
                f"{e['prefill_10s_s']['median']:.2f} s | {e['prefill_120s_s']['median']:.2f} s | "
                f"{e['peak_rss_bytes'] / 1e9:.2f} GB | {e['load_s']:.2f} s | {caption_text} | {agreement_cells(e)} | "
                f"{max(e['decode_step_s']['others_cores']):.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape, few tokens and clips: a smoke run")
    parser.add_argument("--shapes", nargs="+", default=None, help="default af2-0.5b af2-3b (--quick: tiny)")
    parser.add_argument(
        "--variants", nargs="+", type=parse_variant, default=None, help=f"default {' '.join(VARIANTS)}"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per item (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="decoding steps per timed run (default 8; --quick 2)")
    parser.add_argument("--clips", type=int, default=None, help="inputs of the agreement check (default 3)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per input (default 12)")
    parser.add_argument("--caption-clips", nargs="+", default=[], metavar="SHAPE=N",
                        help=f"caption clips per shape (default {CAPTION_CLIPS}; 0 skips the caption)")  # fmt: skip
    parser.add_argument("--caption-tokens", type=int, default=None, help="new tokens per caption (default 32)")
    parser.add_argument(
        "--caption-max-seconds", type=float, default=None, help="longest clip (default 120; --quick 20)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="af2 caption's batch size")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs before each item (default 1; --quick 0)"
    )
    add_margin_argument(parser)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="file name stem of the results (default cpu-table[-quick])")
    parser.add_argument("--child", type=parse_variant, help=argparse.SUPPRESS)
    parser.add_argument("--save-random", help=argparse.SUPPRESS)
    for hidden in ("--checkpoint", "--clip-dir", "--reference", "--label"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = dict(shapes=["tiny"], variants=[parse_variant(v) for v in QUICK_VARIANTS], repeats=1, steps=2, clips=1,
                 new_tokens=3, caption_tokens=3, caption_max_seconds=20.0, warmup=0)  # fmt: skip
    full = dict(shapes=["af2-0.5b", "af2-3b"], variants=[parse_variant(v) for v in VARIANTS], repeats=3, steps=8,
                clips=3, new_tokens=12, caption_tokens=32, caption_max_seconds=120.0, warmup=1)  # fmt: skip
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    counts = dict(CAPTION_CLIPS)
    for item in args.caption_clips:
        shape, _, count = item.partition("=")
        if not count.isdigit():
            parser.error(f"--caption-clips {item!r}: write SHAPE=N, e.g. af2-3b=8")
        counts[shape] = int(count)
    args.caption_counts = counts
    args.name = args.name or ("cpu-table-quick" if args.quick else "cpu-table")
    return args


def write_results(args, results) -> str:
    """Write the JSON and the Markdown table of the shapes measured so far; return the Markdown."""
    done = list(results["shapes"])
    header = (
        f"{', '.join(done)}; {args.threads} threads; decode step: median of {args.repeats} runs of "
        f"{args.steps} steps; agreement: {args.clips} inputs x {args.new_tokens} greedy tokens; caption: "
        + ", ".join(f"{s} {results['shapes'][s]['caption_clips']} clips{caption_note(s, results)}" for s in done)
        + f" of 3-{args.caption_max_seconds:g} s, {args.caption_tokens} tokens, batch {args.batch_size}; "
        f"whole run {results['seconds'] / 60:.1f} min"
    )
    markdown = header + "\n\n" + format_table(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, str(args.out_dir / f"{args.name}.json"))
    (args.out_dir / f"{args.name}.md").write_text(markdown + "\n")
    return markdown


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.save_random:
        build_random_model(args.save_random, torch.float32, torch.device("cpu")).save_pretrained(args.checkpoint)
        return 0
    started = time.perf_counter()
    results = {
        "machine": machine_description(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "checkpoint", "clip_dir", "reference",
                                                                      "label", "out_dir", "variants")},
        "variants": [variant_name(*v) for v in args.variants],
        "shapes": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for shape in args.shapes:
            shape_started = time.perf_counter()
            log(f"{shape}: saving a random model (float32)")
            checkpoint = scratch / shape
            # In a process of its own: this one would keep the freed model's pages (GBs for af2-3b) beside the
            # variants' processes.
            subprocess.run(
                [sys.executable, __file__, "--save-random", shape, "--checkpoint", str(checkpoint)], check=True
            )
            clip_dir = scratch / f"clips-{shape}"
            clip_dir.mkdir()
            count = args.caption_counts.get(shape, 0)
            seconds = write_clips(clip_dir, count, 3.0, args.caption_max_seconds) if count else []
            reference = scratch / f"reference-{shape}.pt"
            entry = {"caption_clips": count, "caption_audio_seconds": sum(seconds), "variants": {}}
            for variant in args.variants:
                name = variant_name(*variant)
                library = missing_library(variant[1])
                if library:
                    log(f"{shape} {name}: skipped, {library} is not installed")
                    entry["variants"][name] = {"skipped": f"{library} is not installed"}
                    continue
                entry["variants"][name] = run_child(args, checkpoint, variant, clip_dir, reference, f"{shape} {name}")
            entry["seconds"] = time.perf_counter() - shape_started
            results["shapes"][shape] = entry
            for path in (checkpoint, clip_dir):
                shutil.rmtree(path)
            # Each finished shape is on disk before the next starts: a crash in af2-3b (a full disk, the OOM killer)
            # keeps af2-0.5b's rows.
            results["seconds"] = time.perf_counter() - started
            markdown = write_results(args, results)
    print(markdown)
    failed = [
        f"{shape} {name}"
        for shape, e in results["shapes"].items()
        for name, v in e["variants"].items()
        if "failed" in v
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
