"""Timing under noise (other processes on a small machine), and the process's memory and machine figures."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far. Linux: VmHWM, the high-water mark of this process's own address
    space. (ru_maxrss is not used there: exec keeps the maximum of the pre-exec address space, so a child started
    by a 7 GB parent reports at least 7 GB.) Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat), or NaN off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def timed(fn, device: torch.device) -> tuple[float, float, object]:
    """Runs `fn` once: (wall seconds, cores used by other processes meanwhile, fn's result)."""
    synchronize(device)
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    result = fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    others = (busy_cpu_seconds() - busy - (own_cpu_seconds() - own)) / max(elapsed, 1e-9)
    return elapsed, max(0.0, others), result


class NoiseMonitor:
    """
    Other processes on a small machine distort timings badly: with 2 torch threads on 2 cores, every parallel region
    waits for a thread the scheduler gave away. This measures how many cores *other* processes kept busy during a
    run (machine busy time minus our own, see `timed`), waits for a quiet moment before a run, and holds how
    much disturbance `Timer.measure` tolerates before it retries a run.
    """

    def __init__(self, tolerance: float, max_wait: float, attempts: int):
        self.tolerance = tolerance
        self.max_wait = max_wait
        self.attempts = max(1, attempts)
        self.waited_s = 0.0

    def wait_for_quiet(self) -> None:
        deadline = time.monotonic() + self.max_wait
        while time.monotonic() < deadline:
            busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
            time.sleep(0.5)
            others = (busy_cpu_seconds() - busy - (own_cpu_seconds() - own)) / (time.monotonic() - start)
            if not others > self.tolerance:  # NaN (no /proc/stat) counts as quiet
                return
            self.waited_s += time.monotonic() - start


@dataclasses.dataclass(frozen=True)
class Timer:
    """How each item is timed: `warmup` untimed runs, then `repeats` timed runs kept among those `noise` let
    through. Passed to every measurement."""

    noise: NoiseMonitor
    repeats: int
    warmup: int

    def measure(self, fn, device: torch.device) -> dict:
        """Runs `fn` `warmup` times untimed, then timed runs; returns the median and the runs in seconds. When `fn`
        returns a number, that number is the run's time (it timed itself); otherwise the wall time.

        A run during which other processes kept more than `noise.tolerance` cores busy does not count: runs continue
        (after waiting up to `noise.max_wait` s for a quiet machine) until `repeats` quiet runs are collected or
        `noise.attempts` x repeats runs were made; then the least disturbed runs are kept. `others_cores` records
        the disturbance of each kept run, `discarded` how many runs were thrown away."""
        for _ in range(self.warmup):
            fn()
        candidates = []  # (others, elapsed)
        for _ in range(self.repeats * self.noise.attempts):
            self.noise.wait_for_quiet()
            elapsed, others, result = timed(fn, device)
            if isinstance(result, (int, float)) and not isinstance(result, bool):
                elapsed = float(result)
            candidates.append((others, elapsed))
            if sum(o <= self.noise.tolerance for o, _ in candidates) >= self.repeats:
                break
        kept = sorted(candidates, key=lambda c: c[0])[: self.repeats]
        runs = [elapsed for _, elapsed in kept]
        return {
            "median": statistics.median(runs),
            "runs": runs,
            "others_cores": [round(o, 3) for o, _ in kept],
            "discarded": len(candidates) - len(kept),
        }

    def measure_interleaved(self, functions: dict, device: torch.device) -> dict:
        """`measure` for items that are compared with each other (decode step at 10 vs 120 s of audio, sdpa vs
        eager): their runs alternate, the order rotating every round, so that a drift of the machine's speed during
        the item (other tenants of the host are invisible to the noise monitor) hits all of them alike instead of
        one."""
        single = dataclasses.replace(self, repeats=1, warmup=0)
        names = list(functions)
        for name in names:
            for _ in range(self.warmup):
                functions[name]()
        rounds = {name: [] for name in names}
        for index in range(self.repeats):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                rounds[name].append(single.measure(functions[name], device))
        return {
            name: {
                "median": statistics.median(e["runs"][0] for e in entries),
                "runs": [e["runs"][0] for e in entries],
                "others_cores": [e["others_cores"][0] for e in entries],
                "discarded": sum(e["discarded"] for e in entries),
                "interleaved_with": [other for other in names if other != name],
            }
            for name, entries in rounds.items()
        }


def add_interleaved_arguments(parser, repeats: int, steps: int) -> None:
    """The options of the scripts that compare variants interleaved in one process (`decode_profile.py`,
    `quantization_benchmark.py`, `kernel_choice.py`)."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved runs per variant (median reported)")
    parser.add_argument("--steps", type=int, default=steps, help="decoding steps per timed run")
    parser.add_argument("--json-out", help="write the results here as JSON")


def recording_timer(args) -> Timer:
    """For those scripts: applies `--threads` and returns a `Timer` that runs whatever the load and records it (the
    others' cores of every run) instead of waiting for a quiet machine; their variants alternate run by run, so the
    load hits them alike and their ratios stand where absolute times do not."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.decode_steps = args.steps  # the name items.prepare_decode_step reads
    return Timer(NoiseMonitor(tolerance=float("inf"), max_wait=0, attempts=1), repeats=args.repeats, warmup=1)


def write_json(results: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    with contextlib.suppress(ValueError, OSError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def memory_status() -> dict:
    """Current resident memory split into anonymous (tensors we allocated) and file-backed (mmapped safetensors)."""
    return {
        "rss_bytes": current_rss_bytes(),
        "rss_anon_bytes": _proc_status_bytes("RssAnon"),
        "rss_file_bytes": _proc_status_bytes("RssFile"),
    }
