"""Smoke test of benchmarks/benchmark.py: the `tiny` shape end to end, every item, in a fresh process.

No timing thresholds: only that every measurement exists and is a finite positive number (or a count >= 0)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"

AUDIO_KEYS = ("10", "30", "120")
TIMED_BY_AUDIO = ("front_end_s", "audio_encode_s", "prefill_s", "decode_step_s")
TARGETS = (
    "decode_120s_over_10s",
    "decode_over_scaled_floor",
    "decode_over_scaled_floor_all_xattn_params",
    "batch4_speedup",
    "tower_sdpa_speedup_over_eager",
    "peak_rss_120s_generate_over_fp32_weights",
    "bfloat16_peak_rss_over_fp32_peak_rss",
    "weights_held_after_load_over_weights_float32",
    "weights_held_after_load_over_weights_bfloat16",
    "weights_held_after_load_over_weights_bfloat16_from_float32_checkpoint",
    "compile_graph_breaks_per_step",
)


def _positive(value, name):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} = {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{name} = {value!r} is not finite and positive"


def _timing(entry, name, repeats):
    _positive(entry["median"], f"{name}.median")
    assert len(entry["runs"]) == repeats, f"{name} has {len(entry['runs'])} runs, expected {repeats}"
    for index, run in enumerate(entry["runs"]):
        _positive(run, f"{name}.runs[{index}]")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark") / "tiny.json"
    command = [
        sys.executable, str(BENCHMARK), "--shape", "tiny", "--threads", "2", "--repeats", "2", "--warmup", "0",
        "--new-tokens", "3", "--decode-steps", "2", "--quiet-wait", "0", "--attempts", "1", "--json-out", str(out),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "torch threads: 2" in completed.stdout
    assert "| decode step (1 token, cached), 120 s audio" in completed.stdout
    return json.loads(out.read_text())


def test_metadata(tiny_results):
    assert tiny_results["shape"] == "tiny"
    assert tiny_results["threads"] == 2
    assert tiny_results["repeats"] == 2
    for key in ("torch", "transformers", "machine", "command", "decode_step_method"):
        assert tiny_results[key], key
    params = tiny_results["params"]
    for key in ("total", "audio_tower", "audio_transformer", "language_model", "cross_attention",
                "cross_attention_per_step", "bare_lm"):  # fmt: skip
        _positive(params[key], f"params.{key}")
    assert params["cross_attention_per_step"] < params["cross_attention"]
    # The bare LM is the AF2 language model without its cross-attention blocks.
    assert params["bare_lm"] == params["language_model"]
    _positive(tiny_results["weights_bytes"], "weights_bytes")
    _positive(tiny_results["peak_rss_main_bytes"], "peak_rss_main_bytes")


def test_every_stage_is_timed(tiny_results):
    repeats = tiny_results["repeats"]
    for key in TIMED_BY_AUDIO:
        assert set(tiny_results[key]) == set(AUDIO_KEYS), key
        for seconds in AUDIO_KEYS:
            _timing(tiny_results[key][seconds], f"{key}.{seconds}", repeats)
    tower = tiny_results["audio_tower_30s_s"]
    _timing(tower["sdpa"], "audio_tower_30s_s.sdpa", repeats)
    _timing(tower["eager"], "audio_tower_30s_s.eager", repeats)
    assert tower["windows"] == 3
    _timing(tiny_results["bare_lm_decode_step_s"], "bare_lm_decode_step_s", repeats)
    assert set(tiny_results["generate_s"]) == {"10", "120"}
    for seconds in ("10", "120"):
        _timing(tiny_results["generate_s"][seconds], f"generate_s.{seconds}", repeats)
        # A difference of two medians: finite, but on a tiny model it may be noise around zero.
        assert math.isfinite(tiny_results["decode_step_from_generate_s"][seconds])
    batch = tiny_results["batch4"]
    _timing(batch["batched_s"], "batch4.batched_s", repeats)
    _timing(batch["one_by_one_s"], "batch4.one_by_one_s", repeats)
    _positive(batch["speedup"], "batch4.speedup")
    _timing(batch["decode_step_s"], "batch4.decode_step_s", repeats)
    _positive(batch["decode_throughput_speedup"], "batch4.decode_throughput_speedup")
    assert batch["audio_seconds"] == [10, 30, 60, 120] and batch["new_tokens"] == 3


def test_load_and_memory(tiny_results):
    load = tiny_results["load_s"]
    _timing(load, "load_s", tiny_results["repeats"])
    assert load["dtype"] == "float32"
    for key in ("weights_bytes", "rss_baseline_bytes", "rss_after_load_bytes", "rss_after_reading_weights_bytes",
                "peak_rss_bytes"):  # fmt: skip
        _positive(load[key], f"load_s.{key}")
    rss = tiny_results["rss_generate_120s"]
    assert set(rss) == {"float32", "bfloat16", "bfloat16_from_float32_checkpoint"}
    for name, child in rss.items():
        for key in ("load_s", "generate_s", "peak_rss_bytes", "rss_baseline_bytes", "weights_bytes",
                    "weights_bytes_fp32"):  # fmt: skip
            _positive(child[key], f"rss_generate_120s.{name}.{key}")
        for stage in ("after_load", "after_reading_weights", "after_generate"):
            _positive(child[stage]["rss_bytes"], f"rss_generate_120s.{name}.{stage}.rss_bytes")
        assert child["peak_rss_bytes"] >= child["after_generate"]["rss_bytes"] * 0.99
        assert child["checksum_is_finite"]
        assert child["audio_seconds"] == 120 and child["new_tokens"] == 3
    assert rss["bfloat16"]["checkpoint_dtype"] == "bfloat16"
    assert rss["bfloat16_from_float32_checkpoint"]["checkpoint_dtype"] == "float32"
    # The bf16 processes really hold bf16 weights: half the fp32 bytes.
    for name in ("bfloat16", "bfloat16_from_float32_checkpoint"):
        assert rss[name]["weights_bytes"] * 2 == rss["float32"]["weights_bytes"], name
        assert rss[name]["dtype"] == "torch.bfloat16", name


def test_compile_and_targets(tiny_results):
    compiled = tiny_results["compile_decode_step"]
    assert compiled["graph_count"] >= 1 and compiled["graph_break_count"] >= 0
    targets = tiny_results["targets"]
    assert set(TARGETS) <= set(targets), sorted(set(TARGETS) - set(targets))
    for name, target in targets.items():
        assert math.isfinite(target["value"]) and target["value"] >= 0, name
        assert isinstance(target["met"], bool) and target["op"] in ("<=", ">="), name


def test_linear_kernels_compared(tiny_results):
    """The three ways to run the linear layers on CPU are each timed on the same weights, and the measured model
    used the CLI's default (plain nn.Linear)."""
    assert tiny_results["linears_used"] == "plain"
    linears = tiny_results["linears"]
    repeats = tiny_results["repeats"]
    for item in ("tower_window", "decode_step_1", "decode_step_4"):
        for variant in ("plain", "fast"):
            _timing(linears[item][variant], f"linears.{item}.{variant}", repeats)
        _positive(linears[item]["fast_speedup"], f"linears.{item}.fast_speedup")
    _timing(linears["tower_window"]["compiled"], "linears.tower_window.compiled", repeats)
    _positive(linears["tower_window"]["compiled_first_call_s"], "linears.tower_window.compiled_first_call_s")


CPU_TABLE = BENCHMARK.with_name("cpu_table.py")


def test_cpu_table_quick(tmp_path):
    """`cpu_table.py --quick`: every column of the table measured for float32 and bfloat16+int4 (or int4 skipped, said
    so, where torchao is absent), each variant in its own process, written as JSON and Markdown and printed."""
    import importlib.util

    command = [sys.executable, str(CPU_TABLE), "--quick", "--threads", "2", "--out-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    table = (tmp_path / "cpu-table-quick.md").read_text()
    assert table.strip() in completed.stdout
    results = json.loads((tmp_path / "cpu-table-quick.json").read_text())
    variants = results["shapes"]["tiny"]["variants"]
    assert list(variants) == ["float32", "bfloat16+int4"]
    assert results["shapes"]["tiny"]["caption_clips"] == 3
    fp32 = variants["float32"]
    for key in ("decode_step_s", "prefill_10s_s", "prefill_120s_s", "bare_lm_decode_step_s"):
        _timing(fp32[key], key, 1)
    for key in ("load_s", "peak_rss_bytes"):
        _positive(fp32[key], key)
    assert fp32["caption"]["clips"] == 3
    _positive(fp32["caption"]["clips_per_s"], "caption.clips_per_s")
    # float32 against its own reference: the same forward, so no error and every position decisive and equal.
    fidelity = fp32["teacher_forced"]["fidelity"]
    assert fidelity["relative_logit_error_max"] == 0 and fidelity["decisive_share"] == 1
    assert fidelity["decisive_agreement"] == 1 and fp32["agreement_with_float32"]["teacher_forced_tokens"] == 1
    int4 = variants["bfloat16+int4"]
    if importlib.util.find_spec("torchao") is None:
        assert int4 == {"skipped": "torchao is not installed"}
        assert "| tiny | bfloat16+int4 | skipped: torchao is not installed |" in table
        return
    assert int4["bare_lm_decode_step_s"]["quantized"]
    error = int4["teacher_forced"]["fidelity"]["relative_logit_error_median"]
    assert 0 < error < 0.25, error  # 4-bit rounding of the LM's linears: a few percent on the tiny model
    assert 0 <= int4["teacher_forced"]["fidelity"]["decisive_share"] <= 1
