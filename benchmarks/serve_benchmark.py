#!/usr/bin/env python
"""Throughput and latency of `af2 serve` with concurrent clients against the same requests one at a time.

Writes `--clips` noise clips of mixed length (as caption_benchmark.py: evenly spread over `--min-seconds`..
`--max-seconds`, shuffled, 44.1 kHz), and for each `--dtypes` entry starts, in a fresh process, the server's app
(`transformers_af2.serving.build_app` under uvicorn on 127.0.0.1) around a random-weight model of a named shape with
a word-level tokenizer over AF2's whole vocabulary (no download). This process is the clients, over HTTP:

  one at a time   each clip's request (base64 WAV, greedy, `--new-tokens` tokens) sent after the previous answer
  concurrent      `--clients` threads send the same requests, each taking the next one as soon as it has its answer;
                  the server batches what arrives while a batch runs (up to `--max-batch-size`)

and reports requests per hour of both, their ratio, the p50/p95 latency of a request (send to answer), the number of
answers that differ between the two passes (greedy: should be 0), and how many cores other processes kept busy.

    python benchmarks/serve_benchmark.py --shape af2-0.5b --threads 2 --json-out benchmarks/results/serve-af2-0.5b.json
    python benchmarks/serve_benchmark.py --shape tiny --clips 8 --max-seconds 25 --new-tokens 4      # seconds
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from caption_benchmark import PROMPT, word_level_processor, write_clips
from measurement import busy_cpu_seconds, log, machine_description, own_cpu_seconds


def serve_child(args) -> None:
    """The server: the model of `--shape` in `--child` dtype behind the app, on `--port`, until killed."""
    import torch
    import uvicorn
    from shapes import build_random_model

    from transformers_af2.serving.app import ServerSettings, build_app
    from transformers_af2.serving.chat_request import Limits

    torch.set_num_threads(args.threads)
    model = build_random_model(args.shape, getattr(torch, args.child), torch.device("cpu"))
    config = model.config
    # As caption_benchmark.py: a random model with tied embeddings repeats `<SEP>`, which hides the answer, and
    # stops at random; every request generates exactly --new-tokens tokens (both passes read this config).
    model.generation_config.suppress_tokens = [config.audio_token_id, config.sep_token_id, config.pad_token_id,
                                               config.end_of_chunk_token_id]  # fmt: skip
    model.generation_config.min_new_tokens = args.new_tokens
    settings = ServerSettings(limits=Limits(max_tokens=args.new_tokens), request_timeout=3600)
    options = {"max_batch_size": args.max_batch_size, "max_queue": 1024}
    app, scheduler = build_app(model, word_level_processor(config), ["bench"], settings, scheduler_options=options)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        scheduler.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(base: str, process: subprocess.Popen, timeout: float = 1800) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(1)
    raise SystemExit("the server did not start in time")


def ask(http, base: str, audio: bytes, new_tokens: int) -> tuple[str, float]:
    """One greedy request: (answer, seconds from send to answer)."""
    data = base64.b64encode(audio).decode()
    content = [
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
        {"type": "text", "text": PROMPT},
    ]
    body = {"model": "bench", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": new_tokens}  # fmt: skip
    start = time.perf_counter()
    response = http.post(f"{base}/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise SystemExit(f"request failed: {response.status_code} {response.text[:500]}")
    return response.json()["choices"][0]["message"]["content"], elapsed


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def measure(args, dtype: str, clips: list[bytes]) -> dict:
    import httpx

    port = free_port()
    command = [sys.executable, __file__, "--child", dtype, "--port", str(port), "--shape", args.shape, "--threads",
               str(args.threads), "--new-tokens", str(args.new_tokens), "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
    server = subprocess.Popen(command)  # its log goes to our stderr
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, server)
        with httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=args.clients + 2)) as http:
            ask(http, base, clips[0], args.new_tokens)  # warm-up

            def one_at_a_time():
                return [ask(http, base, clip, args.new_tokens) for clip in clips]

            def concurrent():
                results = [None] * len(clips)
                lock, next_index = threading.Lock(), [0]

                def client():
                    while True:
                        with lock:
                            index = next_index[0]
                            next_index[0] += 1
                        if index >= len(clips):
                            return
                        results[index] = ask(http, base, clips[index], args.new_tokens)

                with ThreadPoolExecutor(args.clients) as pool:
                    for future in [pool.submit(client) for _ in range(args.clients)]:
                        future.result()
                return results

            runs = {}
            for name, fn in (("one_at_a_time", one_at_a_time), ("concurrent", concurrent)):
                log(f"{dtype}: {name}, {len(clips)} requests")
                before = http.get(f"{base}/health").json()["batch_sizes"]
                elapsed, others, results = timed_with_server(fn, server.pid)
                after = http.get(f"{base}/health").json()["batch_sizes"]
                latencies = [seconds for _, seconds in results]
                runs[name] = {
                    "seconds": elapsed,
                    "requests_per_hour": len(clips) * 3600 / elapsed,
                    "latency_p50_s": statistics.median(latencies),
                    "latency_p95_s": percentile(latencies, 0.95),
                    "others_cores": others,
                    "batch_sizes": {
                        size: count - before.get(size, 0)
                        for size, count in after.items()
                        if count > before.get(size, 0)
                    },  # fmt: skip
                    "answers": [answer for answer, _ in results],
                }
                log(f"{dtype}: {name} {elapsed:.1f} s (others kept {others:.2f} cores busy)")
    finally:
        server.terminate()
        server.wait()
    one, both = runs["one_at_a_time"], runs["concurrent"]
    return {
        **runs,
        "speedup": both["requests_per_hour"] / one["requests_per_hour"],
        "answers_differing": sum(a != b for a, b in zip(one["answers"], both["answers"])),
    }


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of a running process (Linux /proc), NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def timed_with_server(fn, server_pid: int) -> tuple[float, float, object]:
    """As measurement.timed, with the server process's CPU counted as ours: (wall seconds, cores other processes
    kept busy, fn's result)."""
    busy, own, served, start = (
        busy_cpu_seconds(),
        own_cpu_seconds(),
        process_cpu_seconds(server_pid),
        time.perf_counter(),
    )
    result = fn()
    elapsed = time.perf_counter() - start
    ours = own_cpu_seconds() - own + process_cpu_seconds(server_pid) - served
    return elapsed, max(0.0, (busy_cpu_seconds() - busy - ours) / elapsed), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="af2-0.5b")
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--json-out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = Path(tmp) / "clips"
        seconds = write_clips(clip_dir, args.clips, args.min_seconds, args.max_seconds)
        clips = [path.read_bytes() for path in sorted(clip_dir.glob("*.wav"))]
    log(f"{args.clips} clips, {sum(seconds):.0f} s of audio in all")
    runs = {dtype: measure(args, dtype, clips) for dtype in args.dtypes}

    report = {
        "machine": machine_description(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "port", "json_out")},
        "audio_seconds": seconds,
        "runs": runs,
    }
    print(f"\n{args.clips} requests ({args.min_seconds:g}-{args.max_seconds:g} s clips), {args.shape}, {args.new_tokens} "
          f"new tokens greedy, {args.clients} clients, batches of up to {args.max_batch_size}, {args.threads} threads\n")  # fmt: skip
    print("| dtype | one at a time (req/h) | concurrent (req/h) | speed-up | p50 / p95 latency, one at a time | "
          "p50 / p95 latency, concurrent | answers differing | others' cores |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")  # batch sizes the server formed: in the JSON
    for dtype, run in runs.items():
        one, both = run["one_at_a_time"], run["concurrent"]
        print(f"| {dtype} | {one['requests_per_hour']:.0f} | {both['requests_per_hour']:.0f} | {run['speedup']:.2f}x | "
              f"{one['latency_p50_s']:.1f} / {one['latency_p95_s']:.1f} s | {both['latency_p50_s']:.1f} / "
              f"{both['latency_p95_s']:.1f} s | {run['answers_differing']} of {args.clips} | "
              f"{one['others_cores']:.2f} / {both['others_cores']:.2f} |")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
