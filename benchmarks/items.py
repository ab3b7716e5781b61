"""The measurements made in the benchmark's own process. Each takes the `Timer`, the parsed options, the model
and its device, and adds its entry to `results`."""

from __future__ import annotations

import gc
import statistics
import time

import numpy as np
import torch
from measurement import synchronize
from shapes import (
    AUDIO_SECONDS,
    BATCH_AUDIO_SECONDS,
    BATCH_PROMPT_TOKENS,
    audio_features,
    bare_language_model,
    count_params,
    prompts,
)

from transformers_af2 import AudioFlamingo2FeatureExtractor
from transformers_af2.compat import CACHE_KWARG
from transformers_af2.modeling.cpu_linear import disable_fast_cpu_linears, enable_fast_cpu_linears


def bench_front_end(timer, results):
    extractor = AudioFlamingo2FeatureExtractor()
    rng = np.random.default_rng(0)
    out = {}
    for seconds in AUDIO_SECONDS:
        waveform = (rng.standard_normal(seconds * extractor.sampling_rate) * 0.1).astype(np.float32)
        out[str(seconds)] = timer.measure(
            lambda: extractor([waveform], sampling_rate=extractor.sampling_rate, return_tensors="pt"),
            torch.device("cpu"),
        )  # fmt: skip
    results["front_end_s"] = out


def bench_audio_encode(timer, args, model, device, results):
    out = {}
    for seconds in AUDIO_SECONDS:
        features, mask = audio_features([seconds], device)
        out[str(seconds)] = timer.measure(lambda: model.get_audio_features(features, mask), device)
    results["audio_encode_s"] = out


def bench_tower_eager(timer, args, model, device, results):
    """The HTSAT tower alone on 3 windows: SDPA window attention (the default) against transformers' eager path,
    interleaved run by run."""
    tower = model.model.audio_tower
    audio_config = model.config.audio_config
    features, _ = audio_features([30], device)
    windows = features[0].unsqueeze(1).to(dtype=next(tower.parameters()).dtype)
    saved = audio_config._attn_implementation

    def with_attention(name):
        def run():
            audio_config._attn_implementation = name
            tower(windows)

        return run

    try:
        out = timer.measure_interleaved({name: with_attention(name) for name in ("sdpa", "eager")}, device)
    finally:
        audio_config._attn_implementation = saved
    out["windows"] = windows.shape[0]
    out["eager_over_sdpa"] = out["eager"]["median"] / out["sdpa"]["median"]
    results["audio_tower_30s_s"] = out


def bench_prefill(timer, args, model, device, results):
    ids, mask = prompts([args.prompt_tokens], model.config, device)
    out = {}
    for seconds in AUDIO_SECONDS:
        features, features_mask = audio_features([seconds], device)

        def run():
            return model(input_ids=ids, attention_mask=mask, input_features=features,
                         input_features_mask=features_mask, use_cache=True, logits_to_keep=1)  # fmt: skip

        out[str(seconds)] = timer.measure(run, device)
    results["prefill_s"] = out


def prepare_decode_step(model, device, args, ids, mask, **prefill_inputs):
    """Prefills once (the model's own cache, audio K/V included) and returns a function that times
    `args.decode_steps` single-token forwards on that cache, crops it back, and returns seconds per step."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **prefill_inputs)
    cache = out[CACHE_KWARG]
    prefill_length = cache.get_seq_length()
    first_token = out.logits[:, -1:].argmax(-1)
    ones = torch.ones(ids.shape[0], 1, dtype=mask.dtype, device=device)

    def run():
        step_mask, token = mask, first_token
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            step_mask = torch.cat([step_mask, ones], dim=1)
            logits = model(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE_KWARG: cache}).logits
            token = logits[:, -1:].argmax(-1)
        synchronize(device)
        elapsed = time.perf_counter() - start
        cache.crop(prefill_length - cache.get_seq_length())  # negative: tokens to remove
        return elapsed / args.decode_steps

    return run


def decode_step_time(timer, model, device, args, ids, mask, **prefill_inputs) -> dict:
    """Seconds per decoding step (median over `repeats` runs of `decode_steps` steps, after warm-up)."""
    return timer.measure(prepare_decode_step(model, device, args, ids, mask, **prefill_inputs), device)


def bench_decode(timer, args, model, device, results):
    """Decode step with 10, 30 and 120 s of audio, interleaved: the 120 s / 10 s ratio is a target."""
    ids, mask = prompts([args.prompt_tokens], model.config, device)
    runs = {}
    for seconds in AUDIO_SECONDS:
        features, features_mask = audio_features([seconds], device)
        runs[str(seconds)] = prepare_decode_step(
            model, device, args, ids, mask, input_features=features, input_features_mask=features_mask
        )
    results["decode_step_s"] = timer.measure_interleaved(runs, device)


def bench_floor(timer, args, model, dtype, device, results):
    lm = bare_language_model(model.config, dtype, device)
    ids, mask = prompts([args.prompt_tokens], model.config, device)
    results["bare_lm_decode_step_s"] = decode_step_time(timer, lm, device, args, ids, mask)
    results["params"]["bare_lm"] = count_params(lm)
    del lm
    gc.collect()


def bench_generate(timer, args, model, device, results):
    ids, mask = prompts([args.prompt_tokens], model.config, device)
    out = {}
    for seconds in (10, 120):
        features, features_mask = audio_features([seconds], device)

        def run():
            generated = model.generate(
                input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                pad_token_id=model.config.pad_token_id,
            )  # fmt: skip
            assert generated.shape[1] == ids.shape[1] + args.new_tokens, generated.shape

        out[str(seconds)] = timer.measure(run, device)
    results["generate_s"] = out
    if "prefill_s" in results:
        results["decode_step_from_generate_s"] = {
            key: (out[key]["median"] - results["prefill_s"][key]["median"]) / args.new_tokens for key in out
        }


def bench_batch(timer, args, model, device, results):
    """4 prompts of different audio lengths and prompt lengths: one left-padded batch against one at a time, the same
    number of new tokens each."""
    config = model.config
    ids, mask = prompts(BATCH_PROMPT_TOKENS, config, device, seed=3)
    features, features_mask = audio_features(BATCH_AUDIO_SECONDS, device, seed=3)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=config.pad_token_id)  # fmt: skip

    def batched():
        model.generate(input_ids=ids, attention_mask=mask, input_features=features,
                       input_features_mask=features_mask, **gen)  # fmt: skip

    singles = []
    for row, length in enumerate(BATCH_PROMPT_TOKENS):
        windows = int(features_mask[row].sum())
        singles.append((ids[row : row + 1, -length:], mask[row : row + 1, -length:],
                        features[row : row + 1, :windows], features_mask[row : row + 1, :windows]))  # fmt: skip

    def one_by_one():
        for row_ids, row_mask, row_features, row_features_mask in singles:
            model.generate(input_ids=row_ids, attention_mask=row_mask, input_features=row_features,
                           input_features_mask=row_features_mask, **gen)  # fmt: skip

    out = {
        "audio_seconds": list(BATCH_AUDIO_SECONDS),
        "prompt_tokens": list(BATCH_PROMPT_TOKENS),
        "new_tokens": args.new_tokens,
    }
    # Interleaved: the speedup is a ratio of the two, and each takes tens of seconds, long enough for the host's
    # speed to drift between them.
    timings = timer.measure_interleaved({"batched_s": batched, "one_by_one_s": one_by_one}, device)
    out.update(timings)
    out["speedup"] = out["one_by_one_s"]["median"] / out["batched_s"]["median"]
    # Decoding alone: one step of the padded batch (4 tokens) against one step of a single sequence.
    out["decode_step_s"] = decode_step_time(timer, model, device, args, ids, mask, input_features=features,
                                            input_features_mask=features_mask)  # fmt: skip
    single = results.get("decode_step_s")
    if single:
        mean_single = statistics.mean(entry["median"] for entry in single.values())
        out["decode_throughput_speedup"] = len(BATCH_AUDIO_SECONDS) * mean_single / out["decode_step_s"]["median"]
    results["batch4"] = out


def bench_linears(timer, args, model, device, results):
    """The three ways to run the model's linear layers on CPU, interleaved run by run on the same weights: plain
    `nn.Linear` (how the model is built), `FastCPULinear` (the opt-in the CLI enables on CPU) and `torch.compile`
    with inductor's weight freezing over the plain model. Measured: one HTSAT window and one decoding step with
    10 s of audio for 1 and for 4 sequences. The compiled variant's one-time compile is reported separately."""
    import torch._inductor.config as inductor_config

    disable_fast_cpu_linears(model)
    tower = model.model.audio_tower
    features, _ = audio_features([10], device)
    window = features[0, :1].unsqueeze(1).to(dtype=next(tower.parameters()).dtype)
    ids1, mask1 = prompts([args.prompt_tokens], model.config, device)
    ids4, mask4 = prompts(list(BATCH_PROMPT_TOKENS), model.config, device)
    features4, features_mask4 = audio_features([10] * 4, device)
    inputs1 = dict(input_features=features, input_features_mask=torch.ones(1, 1, dtype=torch.bool, device=device))
    inputs4 = dict(input_features=features4, input_features_mask=features_mask4)

    def variant(name):
        def enter():
            disable_fast_cpu_linears(model)
            if name == "fast":
                enable_fast_cpu_linears(model)

        return enter

    out = {}
    for label, make in (
        ("tower_window", lambda: lambda: tower(window)),
        ("decode_step_1", lambda: prepare_decode_step(model, device, args, ids1, mask1, **inputs1)),
        ("decode_step_4", lambda: prepare_decode_step(model, device, args, ids4, mask4, **inputs4)),
    ):
        functions = {}
        for name in ("plain", "fast"):
            variant(name)()
            run, enter = make(), variant(name)

            def timed(run=run, enter=enter):
                enter()
                return run()

            functions[name] = timed
        out[label] = timer.measure_interleaved(functions, device)
        out[label]["fast_speedup"] = out[label]["plain"]["median"] / out[label]["fast"]["median"]
    disable_fast_cpu_linears(model)

    # torch.compile with weight freezing (constant-folds the weights into the graph, lets inductor pick its GEMMs).
    saved = inductor_config.freezing
    inductor_config.freezing = True
    try:
        torch._dynamo.reset()
        compiled_tower = torch.compile(tower)
        start = time.perf_counter()
        compiled_tower(window)
        compile_s = time.perf_counter() - start
        plain_tower = timer.measure(lambda: tower(window), device)
        compiled = timer.measure(lambda: compiled_tower(window), device)
        out["tower_window"]["compiled"] = compiled
        out["tower_window"]["compiled_first_call_s"] = compile_s
        out["tower_window"]["compiled_speedup"] = plain_tower["median"] / compiled["median"]
    finally:
        inductor_config.freezing = saved
        torch._dynamo.reset()
    if args.linears == "fast":
        enable_fast_cpu_linears(model)
    results["linears"] = out


def bench_compile(args, model, device, results):
    """Graph breaks of one decoding step (audio read from the cache) under torch.compile's tracer."""
    import torch._dynamo

    ids, mask = prompts([args.prompt_tokens], model.config, device)
    features, features_mask = audio_features([10], device)
    out = model(input_ids=ids, attention_mask=mask, input_features=features, input_features_mask=features_mask,
                use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = out[CACHE_KWARG]
    step_ids = out.logits[:, -1:].argmax(-1)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    torch._dynamo.reset()
    start = time.perf_counter()
    explanation = torch._dynamo.explain(model)(input_ids=step_ids, attention_mask=step_mask, **{CACHE_KWARG: cache})
    elapsed = time.perf_counter() - start
    torch._dynamo.reset()
    results["compile_decode_step"] = {
        "graph_count": explanation.graph_count,
        "graph_break_count": explanation.graph_break_count,
        "break_reasons": [str(reason.reason) for reason in explanation.break_reasons][:10],
        "trace_s": elapsed,
    }
