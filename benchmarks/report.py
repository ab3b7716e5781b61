"""The benchmark's targets (ratios with their limits) and its Markdown table."""

from __future__ import annotations

# What NVIDIA's original implementation measured on this kind of machine (random weights shaped like AF2-0.5B,
# fp32, 2 threads), from the issue; only comparable to a run of `--shape af2-0.5b --threads 2` in fp32 on CPU.
ORIGINAL_AF2_05B = {
    "decode_step_s": {"10": 0.28, "120": 0.65},
    "prefill_s": {"10": 1.5, "120": 12.1},
    "generate_32_s": {"10": 10.2, "120": 32.1},
    "batch4_speedup": 1.35,
    "peak_rss_bytes": 6.0e9,
    "weights_bytes": 4.3e9,
}


def compute_targets(results) -> dict:
    """The issue's targets as ratios, with the threshold and whether the run meets it."""
    targets = {}

    def add(name, value, limit, kind, note=""):
        met = value <= limit if kind == "<=" else value >= limit
        targets[name] = {"value": value, "limit": limit, "op": kind, "met": bool(met), "note": note}

    decode = results.get("decode_step_s")
    if decode:
        add("decode_120s_over_10s", decode["120"]["median"] / decode["10"]["median"], 1.1, "<=",
            "K/V once per generate")  # fmt: skip
    floor = results.get("bare_lm_decode_step_s")
    params = results["params"]
    if decode and floor and "bare_lm" in params:
        worst = max(v["median"] for v in decode.values())
        lm = params["bare_lm"]
        # Per step the cross-attention blocks run everything but kv_proj (the audio K/V are cached).
        strict = floor["median"] * (lm + params["cross_attention_per_step"]) / lm
        literal = floor["median"] * (lm + params["cross_attention"]) / lm
        add("decode_over_scaled_floor", worst / strict, 1.25, "<=",
            "slowest decode step (10/30/120 s) / (bare-LM step x (LM + per-step cross-attn params) / LM params)")  # fmt: skip
        add("decode_over_scaled_floor_all_xattn_params", worst / literal, 1.25, "<=",
            "same, counting all cross-attention params (kv_proj included) as in the issue's wording")  # fmt: skip
    batch = results.get("batch4")
    if batch:
        add("batch4_speedup", batch["speedup"], 1.6, ">=", "one-by-one time / batched time, same tokens")
    tower = results.get("audio_tower_30s_s")
    if tower:
        add("tower_sdpa_speedup_over_eager", tower["eager_over_sdpa"], 1.0, ">=", "HTSAT tower, 3 windows")
    prefill = results.get("prefill_s")
    if prefill and results.get("compare_with_original"):
        for key, windows in (("10", 1), ("120", 12)):
            original = ORIGINAL_AF2_05B["prefill_s"][key] / windows
            add(f"prefill_{key}s_per_window_over_original", prefill[key]["median"] / windows / original, 1.0, "<=",
                f"original {original:.2f} s per window")  # fmt: skip
    rss = results.get("rss_generate_120s", {})
    if "float32" in rss:
        fp32 = rss["float32"]
        add("peak_rss_120s_generate_over_fp32_weights", fp32["peak_rss_bytes"] / fp32["weights_bytes_fp32"], 1.15,
            "<=", "fresh process: load fp32 checkpoint + generate with 120 s of audio; RSS includes the interpreter")  # fmt: skip
        # "bf16 load ~halves it": a bf16 checkpoint loaded as bf16. A float32 checkpoint cast while loading is
        # reported in the table but not held to this: its float32 file is read through a memory map whose pages
        # count in the RSS until loading ends (what stays afterwards is the weights_held_after_load row below).
        if "bfloat16" in rss:
            add("bfloat16_peak_rss_over_fp32_peak_rss", rss["bfloat16"]["peak_rss_bytes"] / fp32["peak_rss_bytes"],
                0.6, "<=", "~halves it: bf16 checkpoint loaded as bf16")  # fmt: skip
    for name, child in rss.items():
        # After the load, with every weight read once: one copy of the weights (plus the interpreter) or two?
        held = child["after_reading_weights"]["rss_bytes"] - child["rss_baseline_bytes"]
        add(f"weights_held_after_load_over_weights_{name}", held / child["weights_bytes"], 1.15, "<=",
            "(RSS after load and reading every weight - interpreter RSS) / weights' bytes")  # fmt: skip
    compiled = results.get("compile_decode_step")
    if compiled:
        add("compile_graph_breaks_per_step", compiled["graph_break_count"], 0, "<=", "torch._dynamo.explain")
    return targets


def format_table(results) -> str:
    """Markdown table: value, the original's number where the issue gives one (af2-0.5b fp32 CPU runs only), and the
    most cores other processes kept busy during the kept runs of that measurement."""
    original = ORIGINAL_AF2_05B if results.get("compare_with_original") else {}
    rows = []

    def ms(value):
        return f"{value * 1000:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"

    def gb(value):
        return f"{value / 1e9:.2f} GB"

    def noise(entry):
        return f"{max(entry['others_cores']):.2f}" if entry.get("others_cores") else ""

    def timing(name, entry, reference=None):
        rows.append((name, ms(entry["median"]), ms(reference) if reference else "", noise(entry)))

    for key, label in (("front_end_s", "front end (waveform -> log-mel)"),
                       ("audio_encode_s", "audio encode (tower + audio transformer)"),
                       ("prefill_s", f"prefill ({results['prompt_tokens']}-token prompt)"),
                       ("decode_step_s", "decode step (1 token, cached)")):  # fmt: skip
        for seconds, entry in results.get(key, {}).items():
            timing(f"{label}, {seconds} s audio", entry, original.get(key, {}).get(seconds))
    if "audio_tower_30s_s" in results:
        tower = results["audio_tower_30s_s"]
        timing("HTSAT tower alone, 3 windows, sdpa (default)", tower["sdpa"])
        timing("HTSAT tower alone, 3 windows, eager", tower["eager"])
    if "bare_lm_decode_step_s" in results:
        timing("bare Qwen2 LM decode step (the floor)", results["bare_lm_decode_step_s"])
    for seconds, entry in results.get("generate_s", {}).items():
        reference = original.get("generate_32_s", {}).get(seconds) if results["new_tokens"] == 32 else None
        timing(f"generate {results['new_tokens']} tokens, {seconds} s audio", entry, reference)
    for seconds, value in results.get("decode_step_from_generate_s", {}).items():
        rows.append((f"(generate - prefill) / {results['new_tokens']}, {seconds} s audio (indicative)", ms(value), "",
                     ""))  # fmt: skip
    if "batch4" in results:
        batch = results["batch4"]
        timing(f"batch of 4 (10/30/60/120 s audio), left-padded, {batch['new_tokens']} tokens", batch["batched_s"])
        timing("the same 4 one at a time", batch["one_by_one_s"])
        rows.append(("batch-of-4 throughput / one at a time", f"{batch['speedup']:.2f}x",
                     f"{original['batch4_speedup']:.2f}x" if original else "", ""))  # fmt: skip
        timing("decode step of that batch (4 tokens)", batch["decode_step_s"])
        if "decode_throughput_speedup" in batch:
            rows.append(("decoding alone: batch-of-4 tokens/s / single-sequence tokens/s",
                         f"{batch['decode_throughput_speedup']:.2f}x", "", ""))  # fmt: skip
    if "load_s" in results:
        load = results["load_s"]
        timing(f"load saved {load['dtype']} checkpoint (from_pretrained, fresh process)", load)
        rows.append(("RSS of the interpreter with torch + transformers", gb(load["rss_baseline_bytes"]), "", ""))
        rows.append(("RSS after load (weights lazily mmapped)", gb(load["rss_after_load_bytes"]), "", ""))
        rows.append(("RSS after load and reading every weight once", gb(load["rss_after_reading_weights_bytes"]),
                     "", ""))  # fmt: skip
    labels = {"float32": "fp32 checkpoint as fp32", "bfloat16": "bf16 checkpoint as bf16",
              "bfloat16_from_float32_checkpoint": "fp32 checkpoint as bf16"}  # fmt: skip
    for name, child in results.get("rss_generate_120s", {}).items():
        label = labels.get(name, name)
        rows.append((f"{label}: load time (1 run)", ms(child["load_s"]), "", ""))
        rows.append((f"{label}: RSS after load + reading weights", gb(child["after_reading_weights"]["rss_bytes"]),
                     "", ""))  # fmt: skip
        reference = gb(original["peak_rss_bytes"]) if original and name == "float32" else ""
        rows.append((f"{label}: peak RSS, load + generate 120 s (weights {gb(child['weights_bytes'])})",
                     gb(child["peak_rss_bytes"]), reference, ""))  # fmt: skip
    linear_labels = {"tower_window": "HTSAT tower, 1 window", "decode_step_1": "decode step, 1 sequence",
                     "decode_step_4": "decode step, 4 sequences"}  # fmt: skip
    for key, label in linear_labels.items():
        entry = results.get("linears", {}).get(key)
        if entry is None:
            continue
        for variant in ("plain", "fast", "compiled"):
            if variant in entry:
                name = {"plain": "nn.Linear", "fast": "FastCPULinear", "compiled": "torch.compile(freezing)"}[variant]
                timing(f"{label}: {name}", entry[variant])
    if "compile_decode_step" in results:
        compiled = results["compile_decode_step"]
        rows.append(("torch.compile, one decode step: graphs / graph breaks",
                     f"{compiled['graph_count']} / {compiled['graph_break_count']}", "", ""))  # fmt: skip
    rows.append(("peak RSS of the benchmark process (everything above)", gb(results["peak_rss_main_bytes"]), "", ""))

    header = ("measurement", "value", "original" if original else "", "others' cores")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    keep = [i for i in range(4) if i != 2 or original]

    def line(cells):
        return "| " + " | ".join(str(cells[i]).ljust(widths[i]) for i in keep) + " |"

    lines = [line(header), "|" + "|".join("-" * (widths[i] + 2) for i in keep) + "|", *map(line, rows)]
    targets = results.get("targets", {})
    if targets:
        lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
        for name, target in targets.items():
            lines.append(f"| {name} | {target['value']:.3f} | {target['op']} {target['limit']} | "
                         f"{'yes' if target['met'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)
