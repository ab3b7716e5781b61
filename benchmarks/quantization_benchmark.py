#!/usr/bin/env python
"""Precision and weight-only quantization of AF2 on one machine: speed, memory and how many answers stay the same.

Saves a random-weight model of a named shape in float32 (or takes `--checkpoint`), loads it once per variant in one
process (`DTYPE` or `DTYPE+SCHEME`, SCHEME one of `transformers_af2.quantization.QUANTIZATION_NAMES`, loaded through
`from_pretrained(quantization_config=...)` as `--quantization` does), and measures, the variants interleaved run by
run so that the load of other processes hits them alike:

- load time (`from_pretrained`, the file in the page cache) and the resident memory the load added;
- the decoding step (median of `--repeats` runs of `--steps` steps on the cache, 10 s of audio) and tokens/s;
- the prefill with 10 s of audio;
- token agreement with the float32 greedy answers: `--new-tokens` greedy tokens for `--clips` random inputs, the share
  of positions equal to float32's, the number of identical answers, and the teacher-forced agreement (each position
  predicted from float32's own prefix, so one early difference does not count for every later token), with the
  median gap between the two best logits (in standard deviations of the logits) that says how close the calls are;
- a measure that does not need trained weights (`logit_fidelity`): the relative logit error vs float32 per
  teacher-forced position, and the teacher-forced agreement restricted to the positions whose float32 top-1 margin
  exceeds `--margin-k` times the variant's measured logit-error std (with the share of such positions).

    python benchmarks/quantization_benchmark.py --shape af2-0.5b --threads 2 \\
        --variants float32 bfloat16 bfloat16+int8 bfloat16+int4 --json-out results/quantization-af2-0.5b.json
    python benchmarks/quantization_benchmark.py --shape tiny --repeats 1 --clips 1 --new-tokens 4   # seconds

Random weights make agreement a lower bound: their top logits are far closer than a trained model's (the margin
column), so a small rounding difference flips the greedy pick. The restricted agreement counts only the picks the
rounding should not flip; the relative logit error is the size of the perturbation itself (see benchmarks/README.md
for what these do and do not show).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from items import prepare_decode_step
from measurement import (
    add_interleaved_arguments,
    current_rss_bytes,
    log,
    machine_description,
    recording_timer,
    write_json,
)
from shapes import SHAPES, audio_features, build_random_model, prompts

from transformers_af2 import AudioFlamingo2ForConditionalGeneration
from transformers_af2.quantization import QUANTIZATION_NAMES, quantization_config
from transformers_af2.utils import DTYPE_NAMES, parse_dtype


def parse_variant(text: str) -> tuple[str, str | None]:
    dtype, _, scheme = text.partition("+")
    if dtype not in DTYPE_NAMES or (scheme and scheme not in QUANTIZATION_NAMES):
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: write DTYPE or DTYPE+SCHEME, DTYPE one of {', '.join(DTYPE_NAMES)}, SCHEME one of "
            f"{', '.join(QUANTIZATION_NAMES)}"
        )
    return dtype, scheme or None


def load_variant(path, dtype_name: str, scheme: str | None):
    dtype = parse_dtype(dtype_name)
    extra = {"quantization_config": quantization_config(scheme, dtype=dtype)} if scheme else {}
    gc.collect()
    before = current_rss_bytes()
    start = time.perf_counter()
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(path, dtype=dtype, **extra).eval()
    load_s = time.perf_counter() - start
    # Read every plain weight once so that memory-mapped pages count, as after a first generate (quantized weights
    # were materialized by the load).
    with torch.no_grad():
        for parameter in model.parameters():
            if type(parameter) is torch.nn.Parameter:
                parameter.sum()
    return model, {"load_s": load_s, "rss_added_bytes": current_rss_bytes() - before}


def clip_inputs(config, index: int, dtype) -> dict:
    seconds = 10 * (1 + index % 3)
    ids, mask = prompts([16], config, torch.device("cpu"), seed=index)
    features, features_mask = audio_features([seconds], torch.device("cpu"), seed=index)
    return dict(
        input_ids=ids, attention_mask=mask, input_features=features.to(dtype), input_features_mask=features_mask
    )


def greedy_answers(model, clips: int, new_tokens: int, dtype) -> list[list[int]]:
    answers = []
    for index in range(clips):
        inputs = clip_inputs(model.config, index, dtype)
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )  # fmt: skip
        answers.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    return answers


def teacher_forced(model, reference: list[list[int]], dtype) -> dict:
    """One forward per clip over the prompt and float32's answer: the tokens this model would pick at each position
    given float32's prefix (agreement without the cascade of a first difference), its logits there (float32, one
    (answer length, vocab) tensor per clip), and float32-free margins: the gap between this model's two best logits
    at each position, in units of the logits' standard deviation."""
    picks, margins, all_logits = [], [], []
    for index, answer in enumerate(reference):
        inputs = clip_inputs(model.config, index, dtype)
        prompt = inputs["input_ids"].shape[1]
        answer_ids = torch.tensor([answer])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer_ids)], dim=1)
        logits = model(**inputs, use_cache=False).logits[0, prompt - 1 : -1].float()
        picks.append(logits.argmax(-1).tolist())
        all_logits.append(logits)
        top2 = logits.topk(2, dim=-1).values
        margins += ((top2[:, 0] - top2[:, 1]) / logits.std(dim=-1)).tolist()
    return {"picks": picks, "median_top2_margin_in_std": statistics.median(margins), "logits": all_logits}


def logit_fidelity(logits: list[torch.Tensor], reference: list[torch.Tensor], margin_k: float) -> dict:
    """How far a variant's teacher-forced logits are from float32's on the same positions, a measure that does not
    need trained weights: the relative error ||logits - fp32|| / ||fp32|| per position (median and max), the standard
    deviation of the error over every logit (`error_std`), and the agreement of the top-1 restricted to the positions
    whose float32 top-1 margin exceeds `margin_k` x error_std (`decisive_share` of all positions): where the rounding
    cannot plausibly flip the choice, a variant that still disagrees is wrong, not unlucky."""
    variant, fp32 = torch.cat(logits), torch.cat(reference)
    error = variant - fp32
    relative = error.norm(dim=-1) / fp32.norm(dim=-1)
    error_std = error.std().item()
    top2 = fp32.topk(2, dim=-1)
    decisive = (top2.values[:, 0] - top2.values[:, 1]) > margin_k * error_std
    same = variant.argmax(-1) == top2.indices[:, 0]
    return {
        "relative_logit_error_median": relative.median().item(),
        "relative_logit_error_max": relative.max().item(),
        "error_std": error_std,
        "margin_k": margin_k,
        "decisive_share": decisive.float().mean().item(),
        "decisive_positions": int(decisive.sum()),
        "decisive_agreement": same[decisive].float().mean().item() if decisive.any() else float("nan"),
    }


def agreement(answers, reference) -> dict:
    same = sum(a == b for x, y in zip(answers, reference) for a, b in zip(x, y))
    total = sum(len(y) for y in reference)
    return {"tokens": same / total, "identical_answers": sum(x == y for x, y in zip(answers, reference))}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--checkpoint", help="a converted AF2 directory instead of a random model")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=[("float32", None), ("bfloat16", None)])
    add_interleaved_arguments(parser, repeats=3, steps=4)
    parser.add_argument("--clips", type=int, default=4, help="inputs of the agreement check")
    parser.add_argument("--new-tokens", type=int, default=16)
    add_margin_argument(parser)
    return parser.parse_args(argv)


def add_margin_argument(parser) -> None:
    parser.add_argument(
        "--margin-k", type=float, default=4.0,
        help="agreement is also counted on the positions whose float32 top-1 margin exceeds K x the variant's logit "
        "error std (default 4: a flip there is a 2.8-sigma event for independent errors)",
    )  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    timer = recording_timer(args)
    device = torch.device("cpu")
    results = {"machine": machine_description(), "torch": torch.__version__, "variants": {}}
    with tempfile.TemporaryDirectory() as scratch:
        path = args.checkpoint
        if path is None:
            log(f"saving a random {args.shape} model (float32)")
            path = Path(scratch) / args.shape
            build_random_model(args.shape, torch.float32, device).save_pretrained(path)
            gc.collect()
        models, decode_runs, prefill_runs = {}, {}, {}
        reference = reference_logits = None
        for dtype_name, scheme in args.variants:
            name = dtype_name + (f"+{scheme}" if scheme else "")
            log(f"loading {name}")
            model, figures = load_variant(path, dtype_name, scheme)
            dtype = parse_dtype(dtype_name)
            ids, mask = prompts([16], model.config, device)
            features, features_mask = audio_features([10], device)
            audio = dict(input_features=features.to(dtype), input_features_mask=features_mask)
            with torch.inference_mode():
                log(f"greedy answers of {name}")
                answers = greedy_answers(model, args.clips, args.new_tokens, dtype)
                if reference is None and dtype_name == "float32" and scheme is None:
                    reference = answers
                forced = teacher_forced(model, reference, dtype) if reference is not None else None
                if forced is not None:
                    if reference_logits is None:
                        reference_logits = forced["logits"]
                    forced["fidelity"] = logit_fidelity(forced.pop("logits"), reference_logits, args.margin_k)
                decode_runs[name] = prepare_decode_step(model, device, args, ids, mask, **audio)

            def prefill(model=model, ids=ids, mask=mask, audio=audio):
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **audio)

            prefill_runs[name] = prefill
            models[name] = model
            results["variants"][name] = {**figures, "answers": answers, "teacher_forced": forced}
        with torch.inference_mode():
            log("decode steps, interleaved")
            decode = timer.measure_interleaved(decode_runs, device)
            log("prefill 10 s, interleaved")
            prefill = timer.measure_interleaved(prefill_runs, device)
    for name, entry in results["variants"].items():
        entry["decode_step_s"] = decode[name]
        entry["tokens_per_s"] = 1 / decode[name]["median"]
        entry["prefill_10s_s"] = prefill[name]
        if reference is not None:
            entry["agreement_with_float32"] = agreement(entry["answers"], reference)
            entry["agreement_with_float32"]["teacher_forced_tokens"] = agreement(
                entry["teacher_forced"]["picks"], reference
            )["tokens"]
    print(format_table(results))
    write_json(results, args.json_out)
    return 0


AGREEMENT_HEADER = (
    "agreement with fp32: tokens / identical answers / teacher-forced tokens | relative logit error vs fp32 "
    "(median / max) | teacher-forced agreement where fp32's margin > k x error std (k; share of positions)"
)


def agreement_cells(entry) -> str:
    """The AGREEMENT_HEADER cells of one variant's entry (`answers`, `agreement_with_float32`, `teacher_forced`)."""
    agree = entry.get("agreement_with_float32")
    if not agree:
        return "- | - | -"
    fidelity = entry["teacher_forced"]["fidelity"]
    decisive = fidelity["decisive_agreement"]
    # No position's float32 margin clears k x the variant's error: there is nothing to agree on, not a NaN score.
    decisive = "none qualifies" if decisive != decisive else f"{decisive:.1%}"
    return (
        f"{agree['tokens']:.1%} / {agree['identical_answers']} of {len(entry['answers'])} / "
        f"{agree['teacher_forced_tokens']:.1%} | {fidelity['relative_logit_error_median']:.3f} / "
        f"{fidelity['relative_logit_error_max']:.3f} | {decisive} "
        f"(k={fidelity['margin_k']:g}; {fidelity['decisive_share']:.0%})"
    )


def format_table(results) -> str:
    lines = [
        f"| variant | decode step | tokens/s | prefill 10 s | load | RSS added (in-process) | {AGREEMENT_HEADER} | "
        "top-2 logit margin (std) | others' cores (decode) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["variants"].items():
        margin = e["teacher_forced"]["median_top2_margin_in_std"] if e["teacher_forced"] else float("nan")
        lines.append(
            f"| {name} | {e['decode_step_s']['median'] * 1e3:.1f} ms | {e['tokens_per_s']:.2f} | "
            f"{e['prefill_10s_s']['median']:.2f} s | {e['load_s']:.2f} s | {e['rss_added_bytes'] / 1e9:.2f} GB | "
            f"{agreement_cells(e)} | {margin:.2f} | {max(e['decode_step_s']['others_cores']):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
