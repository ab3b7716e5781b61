#!/usr/bin/env python
"""The CPU linear kernels `AF2_LINEAR_KERNELS=auto` would choose on this machine, and what they change.

Builds a random-weight model of a named shape, runs the first-use measurement (`measure_linear_kernels`, the one
`choose_linear_kernels("auto")` caches) and then times, `nn.Linear`'s own path against every alternative interleaved
run by run (so the load of other processes hits both alike): one HTSAT window, and a decoding step with 10 s of audio
for 1 and for 4 sequences.

    python benchmarks/kernel_choice.py --shape af2-0.5b --threads 2 --json-out results/kernels-af2-0.5b.json
    python benchmarks/kernel_choice.py --shape tiny --repeats 1            # seconds
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from items import prepare_decode_step
from measurement import add_interleaved_arguments, log, machine_description, recording_timer, write_json
from shapes import BATCH_PROMPT_TOKENS, SHAPES, audio_features, build_random_model, prompts

from transformers_af2.modeling.cpu_linear import (
    DEFAULT_KERNELS,
    LinearKernels,
    measure_linear_kernels,
    use_linear_kernels,
)
from transformers_af2.utils import DTYPE_NAMES, parse_dtype

VARIANTS = {
    "default": DEFAULT_KERNELS,
    "weight_major": LinearKernels(few_rows="weight_major"),
    "onednn": LinearKernels(many_rows="onednn"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    add_interleaved_arguments(parser, repeats=3, steps=4)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    timer = recording_timer(args)
    device, dtype = torch.device("cpu"), parse_dtype(args.dtype)
    log(f"building {args.shape} ({args.dtype})")
    model = build_random_model(args.shape, dtype, device)
    results = {"machine": machine_description(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    chosen, estimates = measure_linear_kernels(model)
    results["first_use_measurement"] = {"s": time.perf_counter() - start, "chosen": str(chosen), **estimates}
    log(f"measured choice {chosen} in {results['first_use_measurement']['s']:.1f} s")

    tower = model.model.audio_tower
    features, _ = audio_features([10], device)
    window = features[0, :1].unsqueeze(1).to(dtype)
    ids1, mask1 = prompts([16], model.config, device)
    ids4, mask4 = prompts(list(BATCH_PROMPT_TOKENS), model.config, device)
    features4, features_mask4 = audio_features([10] * 4, device)
    audio1 = dict(input_features=features.to(dtype), input_features_mask=torch.ones(1, 1, dtype=torch.long))
    audio4 = dict(input_features=features4.to(dtype), input_features_mask=features_mask4)
    items = {
        "tower_window": (("default", "onednn"), lambda: lambda: tower(window)),
        "decode_step_1": (("default", "weight_major"), lambda: prepare_decode_step(model, device, args, ids1, mask1, **audio1)),
        "decode_step_4": (("default", "weight_major"), lambda: prepare_decode_step(model, device, args, ids4, mask4, **audio4)),
    }  # fmt: skip
    with torch.inference_mode():
        for item, (names, make) in items.items():
            log(item)
            functions = {}
            for name in names:
                use_linear_kernels(model, VARIANTS[name])
                run = make()

                def timed(run=run, kernels=VARIANTS[name]):
                    use_linear_kernels(model, kernels)
                    return run()

                functions[name] = timed
            results[item] = timer.measure_interleaved(functions, device)
            results[item]["speedup"] = results[item]["default"]["median"] / results[item][names[1]]["median"]
    use_linear_kernels(model, DEFAULT_KERNELS)
    print(format_report(results))
    write_json(results, args.json_out)
    return 0


def format_report(results) -> str:
    first = results["first_use_measurement"]
    lines = [f"first-use measurement: {first['s']:.1f} s, chooses {first['chosen']}"]
    for key in ("few_rows_4", "many_rows_256"):
        if key in first:
            lines.append(f"  {key}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in first[key].items()))
    lines += ["", "| item | nn.Linear | alternative | speed-up | others' cores |", "|---|---|---|---|---|"]
    for item in ("tower_window", "decode_step_1", "decode_step_4"):
        entry = results[item]
        other = next(k for k in entry if k not in ("default", "speedup"))
        others = max(entry["default"]["others_cores"] + entry[other]["others_cores"])
        lines.append(
            f"| {item} | {entry['default']['median'] * 1e3:.1f} ms | {other} {entry[other]['median'] * 1e3:.1f} ms "
            f"| {entry['speedup']:.2f}x | {others:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
