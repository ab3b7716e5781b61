#!/usr/bin/env python
"""Where a decoding step of AF2 spends its time, against the bare Qwen2 LM of the same shape and dtype.

Builds a random-weight AF2 model of a named shape and `Qwen2ForCausalLM` of its text config, prefills both
(16-token prompt; AF2 with `--audio-seconds` of audio) and then measures, the two models interleaved run by run so
that the load of other processes hits both alike:

1. the decoding step (median of `--repeats` runs of `--steps` single-token forwards on the cache);
2. the step split by module (forward hooks around each part, so slightly slower than 1): the decoder's
   self-attention, MLP and norms, AF2's gated cross-attention (its four linears and the rest: layer norms,
   attention over the cached audio K/V, gates), the head, and what is left outside every module (masks, rotary,
   cache bookkeeping, Python). For each part: the bytes of weights it reads per step and the speed it reads them at;
3. `generate`'s own work per token (logits processors, AF2's NaN/inf check included, stopping criteria, cache and
   input bookkeeping): the wall time of `generate` minus its model forwards, per new token;
4. the top operators of a few steps under `torch.profiler`.

    python benchmarks/decode_profile.py --shape af2-0.5b --threads 2 --json-out results/decode-profile.json
    python benchmarks/decode_profile.py --shape tiny --repeats 1 --steps 2     # seconds
    python benchmarks/decode_profile.py --shape af2-3b --layers 12 --threads 2   # af2-3b's widths in 24 GB

A decoding step is bound by reading the weights. AF2's step reads the LM's weights plus, in every cross-attention
layer, the q/o projections and the feed-forward of the gated block; the ratio of those bytes is what the step can be
expected to cost over the bare LM at equal speed of reading.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict

import torch
from items import prepare_decode_step
from measurement import add_interleaved_arguments, log, machine_description, recording_timer, timed, write_json
from shapes import SHAPES, audio_features, bare_language_model, build_random_model, prompts

from transformers_af2.generation_utils import NonFiniteLogitsCheck
from transformers_af2.utils import DTYPE_NAMES, parse_dtype


def module_parts(model) -> dict[str, list[torch.nn.Module]]:
    """Modules of a decoding step by part. Works for AF2 (decoder layers with `cross_attn`) and the bare Qwen2."""
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    parts = defaultdict(list)
    for layer in inner.layers:
        parts["self_attn"].append(layer.self_attn)
        parts["mlp"].append(layer.mlp)
        parts["decoder_norms"] += [layer.input_layernorm, layer.post_attention_layernorm]
        cross = getattr(layer, "cross_attn", None)
        if cross is not None:
            parts["cross_attn"].append(cross)  # the whole block; its linears are also listed on their own
            for name in ("q_proj", "o_proj", "ff_up", "ff_down"):
                parts[f"cross_attn.{name}"].append(getattr(cross, name))
    parts["embed_tokens"].append(inner.embed_tokens)
    parts["final_norm"].append(inner.norm)
    parts["lm_head"].append(model.lm_head)
    return dict(parts)


def weight_bytes_read(modules) -> int:
    """Bytes of the parameters a forward of these modules reads (a tied head reads the embedding's)."""
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@contextlib.contextmanager
def part_timers(parts: dict):
    """Accumulates the wall time spent inside each part's modules (CPU: synchronous, so wall time is compute)."""
    totals = defaultdict(float)
    starts = {}
    handles = []
    for name, modules in parts.items():
        for module in modules:

            def pre(module, args, name=name):
                starts[(name, id(module))] = time.perf_counter()

            def post(module, args, output, name=name):
                totals[name] += time.perf_counter() - starts.pop((name, id(module)))

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def step_breakdown(model, run, steps: int) -> dict:
    """Runs `run` (which times `steps` decoding steps) under the part timers; seconds per step by part."""
    parts = module_parts(model)
    with part_timers(parts) as totals:
        step_s = run()
    per_step = {name: totals[name] / steps for name in parts}
    measured = sum(v for k, v in per_step.items() if k != "cross_attn" and not k.startswith("cross_attn."))
    per_step["outside_modules"] = step_s - measured - per_step.get("cross_attn", 0.0)
    if "cross_attn" in per_step:
        linears = sum(per_step[f"cross_attn.{n}"] for n in ("q_proj", "o_proj", "ff_up", "ff_down"))
        per_step["cross_attn.rest"] = per_step["cross_attn"] - linears
    bytes_read = {name: weight_bytes_read(modules) for name, modules in parts.items()}
    bytes_read["lm_head"] = weight_bytes_read([model.lm_head])
    bytes_read["embed_tokens"] = 0  # a step reads one row of the embedding
    return {
        "step_s": step_s,
        "parts_s": per_step,
        "weight_bytes": bytes_read,
        "read_gb_per_s": {
            name: bytes_read[name] / per_step[name] / 1e9
            for name in bytes_read
            if per_step.get(name, 0) > 0 and bytes_read[name] > 0
        },
    }


def generate_overhead(model, device, args, ids, mask, **audio) -> dict:
    """Seconds per new token that `generate` spends outside the model's forwards (median of `repeats`)."""
    forward_s = []
    starts = []
    pre = model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    post = model.register_forward_hook(lambda *_: forward_s.append(time.perf_counter() - starts.pop()))
    overheads = []
    try:
        for _ in range(args.repeats):
            forward_s.clear()
            start = time.perf_counter()
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.steps + 1, min_new_tokens=args.steps + 1,
                do_sample=False, pad_token_id=model.config.pad_token_id, **audio,
            )  # fmt: skip
            total = time.perf_counter() - start
            overheads.append((total - sum(forward_s)) / (args.steps + 1))
    finally:
        pre.remove()
        post.remove()
    return {"median": statistics.median(overheads), "runs": overheads}


def non_finite_check_cost(vocab: int, dtype: torch.dtype, rows: int = 1, repeats: int = 200) -> float:
    """Seconds per call of AF2's NaN/inf logits check on one step's scores."""
    check = NonFiniteLogitsCheck()
    scores = torch.randn(rows, vocab, dtype=dtype)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    check(ids, scores)
    start = time.perf_counter()
    for _ in range(repeats):
        check(ids, scores)
    return (time.perf_counter() - start) / repeats


def top_operators(run, limit: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    add_interleaved_arguments(parser, repeats=5, steps=8)
    parser.add_argument("--audio-seconds", type=float, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--top-ops", type=int, default=12)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="language model layers (default: the shape's): af2-3b and its bare LM in float32 do not fit 24 GB "
        "together, 12 of its 36 layers do, with the same matrices per layer",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    timer = recording_timer(args)
    device, dtype = torch.device("cpu"), parse_dtype(args.dtype)
    depth = f", {args.layers} layers" if args.layers else ""
    log(f"building {args.shape} ({args.dtype}{depth}) and its bare LM")
    model = build_random_model(args.shape, dtype, device, layers=args.layers)
    bare = bare_language_model(model.config, dtype, device)
    ids, mask = prompts([args.prompt_tokens], model.config, device)
    features, features_mask = audio_features([args.audio_seconds], device)
    audio = dict(input_features=features.to(dtype), input_features_mask=features_mask)
    results = {"machine": machine_description(), "args": vars(args), "torch": torch.__version__}

    with torch.inference_mode():
        runs = {
            "af2": prepare_decode_step(model, device, args, ids, mask, **audio),
            "bare_lm": prepare_decode_step(bare, device, args, ids, mask),
        }
        log("decode step, interleaved")
        results["decode_step_s"] = timer.measure_interleaved(runs, device)
        af2_s, bare_s = (results["decode_step_s"][k]["median"] for k in ("af2", "bare_lm"))
        results["af2_over_bare_lm"] = af2_s / bare_s

        log("decode step by part, interleaved")
        breakdowns = {"af2": [], "bare_lm": []}
        loads = {"af2": [], "bare_lm": []}
        for index in range(args.repeats):
            for name, module in (("af2", model), ("bare_lm", bare))[:: 1 if index % 2 == 0 else -1]:
                _, others, breakdown = timed(lambda m=module, n=name: step_breakdown(m, runs[n], args.steps), device)
                breakdowns[name].append(breakdown)
                loads[name].append(round(others, 3))
        results["parts"] = {}
        for name, entries in breakdowns.items():
            keys = entries[0]["parts_s"]
            results["parts"][name] = {
                "step_s": statistics.median(e["step_s"] for e in entries),
                "parts_s": {k: statistics.median(e["parts_s"][k] for e in entries) for k in keys},
                "weight_bytes": entries[0]["weight_bytes"],
                "others_cores": loads[name],
            }
            parts = results["parts"][name]
            parts["read_gb_per_s"] = {
                k: parts["weight_bytes"][k] / parts["parts_s"][k] / 1e9
                for k in parts["weight_bytes"]
                if parts["parts_s"].get(k, 0) > 0 and parts["weight_bytes"][k] > 0
            }
            step_bytes = sum(
                v for k, v in parts["weight_bytes"].items() if k != "cross_attn" and not k.startswith("cross_attn.")
            ) + sum(parts["weight_bytes"].get(f"cross_attn.{n}", 0) for n in ("q_proj", "o_proj", "ff_up", "ff_down"))
            parts["step_weight_bytes"] = step_bytes
        results["weight_bytes_af2_over_bare_lm"] = (
            results["parts"]["af2"]["step_weight_bytes"] / results["parts"]["bare_lm"]["step_weight_bytes"]
        )

        log("generate's own work per token")
        results["generate_overhead_s"] = {
            "af2": generate_overhead(model, device, args, ids, mask, **audio),
            "bare_lm": generate_overhead(bare, device, args, ids, mask),
        }
        results["non_finite_check_s"] = non_finite_check_cost(model.config.text_config.vocab_size, dtype)

        log("operators")
        results["top_operators"] = {"af2": top_operators(runs["af2"], args.top_ops)}
        results["top_operators"]["bare_lm"] = top_operators(runs["bare_lm"], args.top_ops)

    print(format_report(results))
    write_json(results, args.json_out)
    return 0


def format_report(results) -> str:
    ms = 1e3
    step = results["decode_step_s"]
    lines = [
        f"decode step: AF2 {step['af2']['median'] * ms:.1f} ms, bare LM {step['bare_lm']['median'] * ms:.1f} ms, "
        f"ratio {results['af2_over_bare_lm']:.3f}; weights read per step, AF2 / bare LM: "
        f"{results['weight_bytes_af2_over_bare_lm']:.3f}",
        f"others' cores per run: AF2 {step['af2']['others_cores']}, bare LM {step['bare_lm']['others_cores']}",
        "",
        "| part | AF2 ms | bare LM ms | AF2 weights MB | AF2 read GB/s | bare read GB/s |",
        "|---|---|---|---|---|---|",
    ]
    af2, bare = results["parts"]["af2"], results["parts"]["bare_lm"]
    for name in af2["parts_s"]:
        bare_ms = f"{bare['parts_s'][name] * ms:.2f}" if name in bare["parts_s"] else "-"
        lines.append(
            f"| {name} | {af2['parts_s'][name] * ms:.2f} | {bare_ms} | {af2['weight_bytes'].get(name, 0) / 1e6:.0f} | "
            f"{af2['read_gb_per_s'].get(name, 0):.1f} | {bare['read_gb_per_s'].get(name, 0):.1f} |"
        )
    lines.append(f"| step (hooked) | {af2['step_s'] * ms:.1f} | {bare['step_s'] * ms:.1f} | | | |")
    overhead = results["generate_overhead_s"]
    lines += [
        "",
        f"generate's own work per token: AF2 {overhead['af2']['median'] * ms:.2f} ms, "
        f"bare LM {overhead['bare_lm']['median'] * ms:.2f} ms; NaN/inf check alone "
        f"{results['non_finite_check_s'] * ms:.3f} ms",
        "",
    ]
    for name, rows in results["top_operators"].items():
        lines.append(f"top operators, {name}: " + ", ".join(f"{r['op']} {r['self_ms']:.1f} ms" for r in rows))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
