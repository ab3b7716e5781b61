"""Where the prefill time goes, on either side: this package or NVIDIA's original code (run this script with the
original's Python for `--side original`). One WAV file, greedy `generate` of one token (file -> first logits), with
forward hooks timing the stages:

    front end   file -> log-mel windows (ours: the feature extractor; original: `inference.load_audio` plus the
                CLAP wrapper's per-window mel, which runs inside its `clap` module before HTSAT)
    tower       HTSAT over all windows (sum over calls)
    audio transformer, LM prefill (the language model's first forward, cross-attention K/V included)

and, with `--profile`, the ops by self CPU time of one more run. The original side needs `--setup`, the
`original_setup.json` that `original_side_by_side.py --work-dir DIR` leaves in DIR (the same random weights).

    python benchmarks/prefill_stages.py --side ours --audio DIR/noise-120s.wav --threads 1 --repeats 2
    /path/to/original-venv/bin/python benchmarks/prefill_stages.py --side original --setup DIR/original_setup.json \
        --original-repo /path/to/audio-flamingo --audio DIR/noise-120s.wav --threads 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measurement import busy_cpu_seconds, own_cpu_seconds  # noqa: E402  (stdlib + torch only)


class StageClock:
    """Forward hooks that add up the wall time spent inside each named module (all calls of a run)."""

    def __init__(self, modules: dict, first_call_only: tuple = ()):
        self.seconds, self.calls, self._start = defaultdict(float), defaultdict(int), {}
        for name, module in modules.items():
            module.register_forward_pre_hook(self._enter(name, name in first_call_only))
            module.register_forward_hook(self._leave(name))

    def _enter(self, name, first_only):
        def hook(module, args):
            if not (first_only and self.calls[name]):
                self._start[name] = time.perf_counter()

        return hook

    def _leave(self, name):
        def hook(module, args, output):
            if name in self._start:
                self.seconds[name] += time.perf_counter() - self._start.pop(name)
            self.calls[name] += 1

        return hook

    def reset(self):
        self.seconds.clear(), self.calls.clear(), self._start.clear()


def ours(args, prompt_len: int):
    from shapes import build_random_model

    from transformers_af2 import AudioFlamingo2FeatureExtractor

    model = build_random_model(args.shape, torch.float32, torch.device("cpu")).eval()
    if args.linear_kernels != "default":
        from transformers_af2.modeling.cpu_linear import choose_linear_kernels, use_linear_kernels

        kernels = choose_linear_kernels(model, args.linear_kernels)
        use_linear_kernels(model, kernels)
        print(f"linear kernels: {kernels}", file=sys.stderr)
    inner, extractor = model.model, AudioFlamingo2FeatureExtractor()
    clock = StageClock({"tower": inner.audio_tower, "audio transformer": inner.audio_transformer,
                        "LM prefill": inner.language_model}, first_call_only=("LM prefill",))  # fmt: skip
    ids = torch.full((1, prompt_len), 0, dtype=torch.long)
    ids[0, 0], ids[0, -1] = model.config.audio_token_id, model.config.sep_token_id

    def run():
        start = time.perf_counter()
        features = extractor(str(args.audio))
        clock.seconds["front end"] = time.perf_counter() - start
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=features["input_features"],
                       input_features_mask=features["input_features_mask"], max_new_tokens=1, do_sample=False,
                       num_beams=1, pad_token_id=model.config.pad_token_id)  # fmt: skip

    return clock, run


def original(args, prompt_len: int):
    import original_af2_worker as worker

    setup = json.loads(args.setup.read_text())
    directory = worker.inference_dir(args.original_repo.resolve())
    os.chdir(directory)
    factory, flamingo_lm, htsat, inference = worker.import_original(directory)
    model, tokenizer = worker.build_original_model(setup, factory, flamingo_lm, htsat, torch.device("cpu"))
    clock = StageClock({"front end (clap wrapper mel)": model.clap, "tower": model.clap.nvclap,
                        "audio transformer": model.audio_transformer_clap, "LM prefill": model.lang_encoder},
                       first_call_only=("LM prefill",))  # fmt: skip
    ids = torch.full((1, prompt_len), 0, dtype=torch.long)
    ids[0, 0], ids[0, -1] = tokenizer.encode("<audio>")[-1], tokenizer.sep_token_id

    def run():
        start = time.perf_counter()
        clips, mask = inference.load_audio(str(args.audio), setup["clap_config"])
        clock.seconds["front end (load_audio)"] = time.perf_counter() - start
        model.generate(audio_x=clips.unsqueeze(0), audio_x_mask=mask.unsqueeze(0), lang_x=ids, max_new_tokens=1,
                       eos_token_id=tokenizer.eos_token_id, do_sample=False, num_beams=1)  # fmt: skip

    return clock, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "original"], required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--shape", default="af2-0.5b", help="ours: the random model's shape")
    parser.add_argument("--setup", type=Path, help="original: original_setup.json from original_side_by_side.py")
    parser.add_argument("--original-repo", type=Path, help="original: checkout of NVIDIA/audio-flamingo")
    parser.add_argument("--linear-kernels", default="default",
                        help="ours: an AF2_LINEAR_KERNELS setting (auto, default, few_rows=...,many_rows=...)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="one more run under torch.profiler: ops by self CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock, run = (ours if args.side == "ours" else original)(args, args.prompt_tokens)
    runs = []
    with torch.no_grad():
        for _ in range(args.repeats):
            clock.reset()
            busy, own = busy_cpu_seconds(), own_cpu_seconds()
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
            others = (busy_cpu_seconds() - busy - (own_cpu_seconds() - own)) / wall
            runs.append({"total_s": round(wall, 3), **{k: round(v, 3) for k, v in clock.seconds.items()},
                         "others_cores": round(max(0.0, others), 2)})  # fmt: skip
            print(json.dumps(runs[-1]), flush=True)
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                run()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(os.environ.get("ROWS", 15))))
    print(
        json.dumps({"side": args.side, "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs})
    )


if __name__ == "__main__":
    main()
