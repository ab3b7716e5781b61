"""The measurements made in fresh processes: load time and resident memory of a saved checkpoint, and the peak
RSS of loading it and generating. `child_main` is what such a process runs (`benchmark.py --child`)."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from measurement import log, memory_status, peak_rss_bytes
from shapes import audio_features, prompts, weights_bytes

from transformers_af2 import AudioFlamingo2ForConditionalGeneration
from transformers_af2.modeling.cpu_linear import enable_fast_cpu_linears
from transformers_af2.utils import parse_dtype

# The command line a fresh process runs, with `--child`.
CLI = Path(__file__).resolve().with_name("benchmark.py")


def child_main(args) -> None:
    """Runs in a fresh interpreter: load a saved checkpoint (timed), read every weight once (so that lazily mmapped
    weights become resident and the RSS shows how many copies the process holds), optionally generate with
    `--child-seconds` of audio; prints one JSON line with the times and the memory figures."""
    torch.set_num_threads(args.threads)
    report = {"rss_baseline_bytes": peak_rss_bytes()}
    dtype = parse_dtype(args.dtype)
    device = torch.device(args.device)
    start = time.perf_counter()
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype)
    model = model.to(device).eval()
    if args.linears == "fast" and device.type == "cpu":
        enable_fast_cpu_linears(model)
    report["load_s"] = time.perf_counter() - start
    gc.collect()
    report["after_load"] = memory_status()
    report["peak_rss_after_load_bytes"] = peak_rss_bytes()
    with torch.inference_mode():
        # Summed in float32 in slices: a float32 copy of the whole bf16 embedding alone is 0.54 GB, which the peak RSS
        # would count against the model.
        checksum = sum(
            float(part.sum(dtype=torch.float32)) for p in model.parameters() for part in p.reshape(-1).split(1 << 22)
        )
    report["after_reading_weights"] = memory_status()
    report["peak_rss_after_reading_weights_bytes"] = peak_rss_bytes()
    report["checksum_is_finite"] = math.isfinite(checksum)
    report["weights_bytes"] = weights_bytes(model)
    report["weights_bytes_fp32"] = weights_bytes(model, torch.float32)
    report["dtype"] = str(next(model.parameters()).dtype)
    if args.child_seconds:
        ids, mask = prompts([args.prompt_tokens], model.config, device)
        features, features_mask = audio_features([args.child_seconds], device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, input_features=features,
                           input_features_mask=features_mask, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=model.config.pad_token_id)  # fmt: skip
        report["generate_s"] = time.perf_counter() - start
        report["audio_seconds"] = args.child_seconds
        report["new_tokens"] = args.new_tokens
        report["after_generate"] = memory_status()
    report["peak_rss_bytes"] = peak_rss_bytes()
    print("CHILD_RESULT " + json.dumps(report), flush=True)


def run_child(args, checkpoint: Path, dtype: str, seconds: int) -> dict:
    command = [
        sys.executable, str(CLI), "--child", "--checkpoint", str(checkpoint), "--dtype", dtype,
        "--device", args.device, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
        "--prompt-tokens", str(args.prompt_tokens), "--child-seconds", str(seconds), "--linears", args.linears,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT ") :])
    raise RuntimeError(f"child {' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")


def bench_load(timer, args, checkpoint: Path, dtype: str, results):
    """Load time of the saved checkpoint in fresh processes (page cache warm: the file was just written), and the
    resident memory once every weight has been read (one copy of the weights, or two?)."""
    reports = []

    def load_once():
        reports.append(run_child(args, checkpoint, dtype, 0))
        return reports[-1]["load_s"]

    timing = timer.measure(load_once, torch.device("cpu"))
    last = reports[-1]
    results["load_s"] = {
        **timing,
        "dtype": dtype,
        "weights_bytes": last["weights_bytes"],
        "rss_baseline_bytes": max(r["rss_baseline_bytes"] for r in reports),
        "rss_after_load_bytes": max(r["after_load"]["rss_bytes"] for r in reports),
        "rss_after_reading_weights_bytes": max(r["after_reading_weights"]["rss_bytes"] for r in reports),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in reports),
        "last_run": last,
    }


RSS_CASES = {
    # name: (checkpoint dtype, load dtype)
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "bfloat16_from_float32_checkpoint": ("float32", "bfloat16"),
}


def bench_rss(args, checkpoints: dict, results):
    """Peak RSS of fresh processes that load a checkpoint and generate with 120 s of audio: fp32, bf16 from a bf16
    checkpoint (`af2 convert --dtype bfloat16`), and bf16 from the fp32 checkpoint (converted while loading)."""
    out = {}
    for name, (saved, loaded) in RSS_CASES.items():
        if saved not in checkpoints:
            continue
        log(f"rss: fresh process, {saved} checkpoint loaded as {loaded}, generate with 120 s of audio")
        out[name] = run_child(args, checkpoints[saved], loaded, 120)
        out[name]["checkpoint_dtype"] = saved
    results["rss_generate_120s"] = out
