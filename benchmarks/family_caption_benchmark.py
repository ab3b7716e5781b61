#!/usr/bin/env python
"""`af2 caption` throughput per model family (AF2, Audio Flamingo 3, Music Flamingo) on tiny-but-real shapes, in one
run on one machine.

"Tiny-but-real": each family's real front end and prompt (AF2: 10 s log-mel windows, `<audio>` + question + `<SEP>`;
AF3 / MF: 30 s Whisper windows, 750 `<sound>` tokens per window in the chat template), so the audio work and the
prompt lengths are the real ones, around small random models of equal size (language model: 4 Qwen2 layers of 64;
AF3 / MF audio encoder: 4 layers of 64 over the real 128 mels x 3000 frames; AF2: shapes.py's "tiny"). No download.

For each family, in a fresh process, the same clips (noise and tone, 44.1 kHz so every front end resamples, lengths
spread over `--min-seconds`..`--max-seconds`) are answered one at a time (the family's `answer` on one clip) and
through `caption()` (DataLoader worker reading audio, batches grouped by windows); it reports clips per hour of
both, their ratio, the share of identical answers, and the cores other processes kept busy meanwhile.

    python benchmarks/family_caption_benchmark.py --threads 2 --json-out benchmarks/results/family-caption.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from caption_benchmark import (
    agreement,
    caption_rows,
    suppress_control_tokens,
    time_paths,
    word_level_processor,
    write_clips,
)
from measurement import machine_description
from shapes import build_random_model

FAMILIES = ("audioflamingo2", "audioflamingo3", "musicflamingo")
PROMPT = "Describe the audio in detail."
TESTS = Path(__file__).resolve().parents[1] / "tests"


def build(family: str):
    """(model, processor) of `family`, float32, random weights."""
    if family == "audioflamingo2":
        model = build_random_model("tiny", torch.float32, torch.device("cpu"))
        suppress_control_tokens(model)
        return model.eval(), word_level_processor(model.config)
    sys.path.insert(0, str(TESTS))
    from families_fixtures import tiny_config, tiny_processor
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        GenerationConfig,
        MusicFlamingoForConditionalGeneration,
    )

    config = tiny_config(
        family,
        audio=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        text=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
        ),
    )
    model_class = {
        "audioflamingo3": AudioFlamingo3ForConditionalGeneration,
        "musicflamingo": MusicFlamingoForConditionalGeneration,
    }[family]
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[2, 0], pad_token_id=0, do_sample=False)
    # No eos: every answer is `--new-tokens` long, so both paths do the same amount of decoding.
    model.generation_config.suppress_tokens = [0, 2]
    return model, tiny_processor(family)


def child(args) -> None:
    from transformers_af2.families import family_for

    torch.set_num_threads(args.threads)
    model, processor = build(args.child)
    family = family_for(model, processor)
    clips = sorted(Path(args.clip_dir).glob("*.wav"))
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def one_at_a_time():
        return [family.answer(model, [PROMPT], [str(path)], generate)[0] for path in clips]

    windows = {}

    def af2_caption():
        rows = caption_rows(args.clip_dir, model, processor, args.new_tokens, args.batch_size, num_workers=1)
        windows.update((name, row["windows"]) for name, row in rows.items())
        return [rows[path.name]["answer"] for path in clips]

    paths = [("one_at_a_time", one_at_a_time), ("caption", af2_caption)]
    results = {"family": family.display_name, "window_seconds": family.window_seconds}
    results.update(time_paths(paths, args.child, len(clips)))
    results["windows"] = [windows[path.name] for path in clips]
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--max-seconds", type=float, default=70.0)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--clip-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    report = {"machine": machine_description(), "settings": vars(args), "families": {}}
    with tempfile.TemporaryDirectory() as folder:
        seconds = write_clips(Path(folder), args.clips, args.min_seconds, args.max_seconds)
        report["clip_seconds"] = seconds
        for family in args.families.split(","):
            command = [sys.executable, __file__, "--child", family, "--clip-dir", folder, "--threads",
                       str(args.threads), "--new-tokens", str(args.new_tokens), "--batch-size",
                       str(args.batch_size)]  # fmt: skip
            result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:
                raise SystemExit(f"the {family} run failed (exit {result.returncode})")
            run = json.loads(result.stdout.strip().splitlines()[-1])
            same = agreement(run["caption"]["answers"], run["one_at_a_time"]["answers"])
            run["speedup"] = run["caption"]["clips_per_hour"] / run["one_at_a_time"]["clips_per_hour"]
            run["caption_vs_one_at_a_time"] = same
            report["families"][family] = run
            print(
                f"{run['family']:>17}: one at a time {run['one_at_a_time']['clips_per_hour']:8.0f} clips/h, "
                f"af2 caption {run['caption']['clips_per_hour']:8.0f} clips/h ({run['speedup']:.2f}x), "
                f"identical answers {same['identical_answers']:.0%}, windows {sum(run['windows'])}"
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
