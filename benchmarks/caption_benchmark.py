#!/usr/bin/env python
"""Throughput of `af2 caption` against the same clips one at a time through `model.generate`, in one run.

Writes `--clips` noise clips of mixed length (evenly spread over `--min-seconds`..`--max-seconds`, shuffled, 44.1 kHz
so the front end resamples), builds a random-weight model of a named shape (see shapes.py) with a word-level
tokenizer over AF2's whole vocabulary (no download), and for each `--dtypes` entry, in a fresh process:

  one at a time   for each clip: processor(text, audio=path) -> model.generate (greedy, `--new-tokens`)
  af2 caption     caption(folder, ...) in the same process: workers read the audio, clips grouped by windows,
                  batches of `--batch-size`, rows appended to a JSONL part

and reports clips per hour of both, their ratio, the bf16 speed-up over fp32 one-at-a-time, the token agreement
of the answers (caption vs one at a time in the same dtype; bf16 vs fp32), the peak RSS of the process after the
model was built (VmHWM reset), and how many cores other processes kept busy meanwhile.

    python benchmarks/caption_benchmark.py --shape af2-0.5b --threads 2 --json-out benchmarks/results/caption-af2-0.5b.json
    python benchmarks/caption_benchmark.py --shape tiny --clips 6 --max-seconds 25 --new-tokens 4   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from measurement import log, machine_description, peak_rss_bytes, timed
from shapes import SHAPES, build_random_model

from transformers_af2.processing.processing_audioflamingo2 import (
    AUDIO_TOKEN,
    END_OF_CHUNK_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SEP_TOKEN,
)

PROMPT = "Describe the audio in detail."
SOURCE_RATE = 44100


def word_level_processor(config):
    """AF2's processor with a word-level tokenizer whose tokens `t<i>` cover every id of the model's vocabulary and
    whose special tokens have the config's ids: prompts of realistic length, every generated id decodable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from transformers_af2 import AudioFlamingo2FeatureExtractor, AudioFlamingo2Processor

    specials = {
        AUDIO_TOKEN: config.audio_token_id,
        END_OF_CHUNK_TOKEN: config.end_of_chunk_token_id,
        PAD_TOKEN: config.pad_token_id,
        SEP_TOKEN: config.sep_token_id,
        EOS_TOKEN: config.eos_token_id,
    }
    by_id = {index: token for token, index in specials.items()}
    vocab = {by_id.get(i, f"t{i}"): i for i in range(config.text_config.vocab_size)}
    words = ["describe", "the", "audio", "in", "detail", "."]
    for offset, word in enumerate(words):  # the prompt's words as ordinary tokens
        vocab[word] = vocab.pop(f"t{100 + offset}")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token="t0",
        additional_special_tokens=[AUDIO_TOKEN, END_OF_CHUNK_TOKEN, SEP_TOKEN],
    )
    return AudioFlamingo2Processor(feature_extractor=AudioFlamingo2FeatureExtractor(), tokenizer=fast)


def write_clips(folder: Path, count: int, low: float, high: float, seed: int = 0) -> list[float]:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    seconds = np.linspace(low, high, count)
    rng.shuffle(seconds)
    folder.mkdir(parents=True, exist_ok=True)
    for index, length in enumerate(seconds):
        samples = int(length * SOURCE_RATE)
        tone = np.sin(2 * np.pi * rng.uniform(100, 2000) * np.arange(samples) / SOURCE_RATE)
        audio = 0.3 * tone + 0.05 * rng.standard_normal(samples)
        sf.write(folder / f"clip{index:03d}.wav", audio.astype(np.float32), SOURCE_RATE)
    return [float(s) for s in seconds]


def reset_peak_rss() -> bool:
    """Linux: resets VmHWM to the current RSS (writing 5 to clear_refs), so the peak counts from here on."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def answer_tokens(answer: str) -> list[str]:
    return answer.split()


def agreement(first: list[list[str]], second: list[list[str]]) -> dict:
    """Share of token positions (over the first list's answers) with the same token, and of identical answers."""
    same = total = identical = 0
    for a, b in zip(first, second):
        total += len(a)
        same += sum(x == y for x, y in zip(a, b))
        identical += a == b
    return {"token_agreement": same / max(total, 1), "identical_answers": identical / max(len(first), 1)}


def suppress_control_tokens(model) -> None:
    """A random AF2 with tied embeddings tends to repeat its last input token, `<SEP>`, which hides the answer (the
    text after the last `<SEP>`): its generation config suppresses AF2's control tokens. Both timed paths read this
    generation config, so they stay comparable."""
    config = model.config
    model.generation_config.suppress_tokens = [
        config.audio_token_id,
        config.sep_token_id,
        config.pad_token_id,
        config.end_of_chunk_token_id,
    ]


def caption_rows(clip_dir, model, processor, new_tokens: int, batch_size: int, num_workers: int) -> dict[str, dict]:
    """`caption()` over every clip of `clip_dir` with PROMPT, into a temporary file: its rows by file name."""
    from transformers_af2.caption import caption

    with tempfile.TemporaryDirectory() as out:
        output = Path(out) / "captions.jsonl"
        summary = caption(
            [clip_dir],
            output,
            prompts=[PROMPT],
            model=model,
            processor=processor,
            max_new_tokens=new_tokens,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=False,
        )
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert summary.done == len(rows) and not summary.failed, summary
    return {Path(row["path"]).name: row for row in rows}


def time_paths(paths, label: str, clip_count: int) -> dict:
    """Runs each `(name, fn)` of `paths` once, timed (fn returns one answer per clip): seconds, clips per hour, the
    cores other processes kept busy meanwhile, and the answers as tokens, by name."""
    results = {}
    for name, fn in paths:
        log(f"{label}: {name} over {clip_count} clips")
        elapsed, others, answers = timed(fn, torch.device("cpu"))
        results[name] = {
            "seconds": elapsed,
            "clips_per_hour": clip_count * 3600 / elapsed,
            "others_cores": others,
            "answers": [answer_tokens(a) for a in answers],
        }
        log(f"{label}: {name} {elapsed:.1f} s (others kept {others:.2f} cores busy)")
    return results


def child(args) -> None:
    """One dtype: one at a time, then af2 caption, in this process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.child)
    model = build_random_model(args.shape, dtype, torch.device("cpu"))
    if args.linears == "fast":  # the FastCPULinear opt-in; both paths share the model
        from transformers_af2.modeling.cpu_linear import enable_fast_cpu_linears

        enable_fast_cpu_linears(model)
    model.generation_config.max_new_tokens = args.new_tokens
    suppress_control_tokens(model)
    processor = word_level_processor(model.config)
    clips = sorted(Path(args.clip_dir).glob("*.wav"))
    reset_peak_rss()
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def one_at_a_time():
        answers = []
        for path in clips:
            inputs = processor(text=[PROMPT], audio=[str(path)])
            with torch.inference_mode():
                generated = model.generate(**inputs, **generate)
            answers.append(processor.decode_answers(generated[:, inputs["input_ids"].shape[1] :])[0])
        return answers

    def af2_caption():
        rows = caption_rows(args.clip_dir, model, processor, args.new_tokens, args.batch_size, args.num_workers)
        return [rows[path.name]["answer"] for path in clips]

    order = [("one_at_a_time", one_at_a_time), ("caption", af2_caption)]
    results = time_paths(order if not args.caption_first else order[::-1], args.child, len(clips))
    results["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(results))


def run_child(args, dtype: str, clip_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", dtype, "--clip-dir", str(clip_dir), "--shape", args.shape,
               "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--batch-size",
               str(args.batch_size), "--num-workers", str(args.num_workers), "--linears", args.linears]  # fmt: skip
    if args.caption_first:
        command.append("--caption-first")
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # its log goes to our stderr as it comes
    if result.returncode != 0:
        raise SystemExit(f"the {dtype} run failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="af2-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--linears", default="plain", choices=["fast", "plain"], help="FastCPULinear or nn.Linear")
    parser.add_argument("--caption-first", action="store_true", help="measure af2 caption before one at a time")
    parser.add_argument("--json-out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--clip-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = Path(tmp) / "clips"
        seconds = write_clips(clip_dir, args.clips, args.min_seconds, args.max_seconds)
        log(f"{args.clips} clips, {sum(seconds):.0f} s of audio in all")
        runs = {dtype: run_child(args, dtype, clip_dir) for dtype in args.dtypes}

    report = {
        "machine": machine_description(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "clip_dir", "json_out")},
        "audio_seconds": seconds,
        "runs": {},
    }
    print(f"\n{args.clips} clips ({args.min_seconds:g}-{args.max_seconds:g} s), {args.shape}, {args.new_tokens} "
          f"new tokens greedy, batch {args.batch_size}, {args.threads} threads\n")  # fmt: skip
    print("| dtype | one at a time (clips/h) | af2 caption (clips/h) | speed-up | others' cores | peak RSS |")
    print("|---|---|---|---|---|---|")
    for dtype, run in runs.items():
        one, cap = run["one_at_a_time"], run["caption"]
        entry = {
            "one_at_a_time_clips_per_hour": one["clips_per_hour"],
            "caption_clips_per_hour": cap["clips_per_hour"],
            "speedup": cap["clips_per_hour"] / one["clips_per_hour"],
            "one_at_a_time_seconds": one["seconds"],
            "caption_seconds": cap["seconds"],
            "others_cores": [one["others_cores"], cap["others_cores"]],
            "peak_rss_gb": run["peak_rss_bytes"] / 1e9,
            "caption_vs_one_at_a_time": agreement(one["answers"], cap["answers"]),
        }
        report["runs"][dtype] = entry
        print(f"| {dtype} | {one['clips_per_hour']:.0f} | {cap['clips_per_hour']:.0f} | {entry['speedup']:.2f}x | "
              f"{one['others_cores']:.2f} / {cap['others_cores']:.2f} | {entry['peak_rss_gb']:.2f} GB |")  # fmt: skip
    if "float32" in runs and "bfloat16" in runs:
        fp32, bf16 = runs["float32"], runs["bfloat16"]
        report["bfloat16_caption_over_float32_one_at_a_time"] = (
            bf16["caption"]["clips_per_hour"] / fp32["one_at_a_time"]["clips_per_hour"]
        )
        report["bfloat16_vs_float32"] = {
            "caption": agreement(fp32["caption"]["answers"], bf16["caption"]["answers"]),
            "one_at_a_time": agreement(fp32["one_at_a_time"]["answers"], bf16["one_at_a_time"]["answers"]),
        }
        print(f"\nbf16 af2 caption / fp32 one at a time: {report['bfloat16_caption_over_float32_one_at_a_time']:.2f}x")
        print(f"bf16 vs fp32 answers (af2 caption): {report['bfloat16_vs_float32']['caption']}")
    for dtype, entry in report["runs"].items():
        print(f"{dtype}: af2 caption vs one at a time: {entry['caption_vs_one_at_a_time']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
