"""
`af2 fast-settings`: measures the `--fast` candidates (`presets.candidate_settings`) for one model on this machine and
records the choice `--fast` then takes (`presets.write_record`, read back by `presets.fast_settings`). Above
`loading`, which it loads each candidate through, as every command loads a model.
"""

from __future__ import annotations

import os
import statistics
import time

from .presets import (
    AGREEMENT_RULE,
    SPEED_MARGIN,
    candidate_settings,
    choose_setting,
    machine_identity,
    model_files_identity,
    setting_name,
    write_record,
)

DEFAULT_PROMPT = "Describe the audio in detail."


def reference_clips(sampling_rate: int, seconds: float = 10.0) -> dict:
    """Three built-in 10 s clips, the same on every machine (used when no `--audio` is given): a tone with
    harmonics, a rising chirp, clicks at 2 Hz over soft noise."""
    import numpy as np

    time_axis = np.arange(int(seconds * sampling_rate)) / sampling_rate
    tone = sum(0.3 / k * np.sin(2 * np.pi * 220 * k * time_axis) for k in (1, 2, 3))
    chirp = 0.5 * np.sin(2 * np.pi * (200 * time_axis + (3800 / (2 * seconds)) * time_axis**2))
    clicks = 0.02 * np.random.default_rng(0).standard_normal(time_axis.size)
    period = sampling_rate // 2
    clicks[::period] += 0.9
    return {
        "tone-220hz-harmonics": tone.astype(np.float32),
        "chirp-200-4000hz": chirp.astype(np.float32),
        "clicks-2hz-noise": clicks.astype(np.float32),
    }


class _StepClock:
    """A logits processor that only notes the time of each generation step (it changes no score)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _answer_timed(model, family, prompt: str, audio, sampling_rate, new_tokens: int) -> dict:
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock()
    batch = family.to_model(family.inputs([prompt], [audio], sampling_rate), model)
    start = time.perf_counter()
    with torch.inference_mode():
        generated = model.generate(
            **batch, **family.stop_kwargs(model), do_sample=False, num_beams=1, max_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {
        "tokens": generated[0, batch["input_ids"].shape[1] :].tolist(),
        "prefill_s": clock.stamps[0] - start,
        "step_s": statistics.median(steps) if steps else None,
    }


def measure_fast_settings(
    model_id: str,
    device,
    audio: dict | None = None,
    prompt: str = DEFAULT_PROMPT,
    new_tokens: int = 32,
    candidates: list[tuple[str, str | None]] | None = None,
    original_config: str | None = None,
    cache_dir=None,
    report=None,
) -> dict:
    """
    Measures the `--fast` candidates for `model_id` on `device` and records the choice (see `transformers_af2.presets`).
    `audio`: name -> clip (a path, or a waveform at the model's sampling rate; default `reference_clips`);
    `candidates`: `(dtype, scheme)` pairs, most precise first (default `candidate_settings`; float32 is always
    measured first, as the reference). Each candidate is loaded alone, answers one clip to warm up, then every clip
    greedily (up to `new_tokens`). Its `seconds`: the prefill of each clip plus float32's answer length times its
    median decoding step, summed (the time of the same answers, whatever it answered). `report(line)` follows it.
    Returns the record written.
    """
    import gc

    import torch

    from ._version import __version__
    from .families import AudioFlamingo2Family, detect_family, family_for
    from .loading import load_model_and_processor
    from .utils import parse_dtype

    report = report or (lambda line: None)
    device = torch.device(device)
    quantizable = detect_family(os.path.expanduser(str(model_id))) is AudioFlamingo2Family
    candidates = list(candidates or candidate_settings(device, quantizable=quantizable))
    settings = [("float32", None)] + [c for c in candidates if c != ("float32", None)]
    # None for a hub id not downloaded yet: the first load fetches it.
    identity = model_files_identity(model_id, original_config)
    measurements, reference = [], None
    for dtype_name, scheme in settings:
        name = setting_name(dtype_name, scheme)
        report(f"{name}: loading")
        model, processor = load_model_and_processor(
            model_id, device=device, dtype=parse_dtype(dtype_name), original_config=original_config,
            quantization=scheme, linear_kernels="auto" if device.type == "cpu" else None,
        )  # fmt: skip
        model.eval()
        family = family_for(model, processor)
        if audio is None:
            audio = reference_clips(family.sampling_rate)
        clips = list(audio.items())
        rate = family.sampling_rate if not isinstance(clips[0][1], (str, os.PathLike)) else None
        _answer_timed(model, family, prompt, clips[0][1], rate, 2)  # warm-up: first-call work, kernel choice
        answers = {clip: _answer_timed(model, family, prompt, waveform, rate, new_tokens) for clip, waveform in clips}
        del model, processor
        gc.collect()
        if reference is None:
            reference = {clip: answer["tokens"] for clip, answer in answers.items()}
            if not any(reference.values()):
                raise ValueError(
                    f"{model_id}: float32 answered every clip with no token; the agreement rule needs answers (give "
                    "other --audio or --prompt)."
                )
        same = sum(a == b for clip in reference for a, b in zip(answers[clip]["tokens"], reference[clip]))
        total = sum(len(tokens) for tokens in reference.values())
        seconds = sum(
            answer["prefill_s"] + max(len(reference[clip]) - 1, 0) * (answer["step_s"] or 0.0)
            for clip, answer in answers.items()
        )
        entry = {
            "setting": name,
            "dtype": dtype_name,
            "quantization": scheme,
            "seconds": seconds,
            "agreement": {
                "tokens": same / total if total else 1.0,
                "identical_answers": sum(answers[clip]["tokens"] == reference[clip] for clip in reference),
                "answers": len(reference),
            },
            "clips": answers,
        }
        measurements.append(entry)
        report(
            f"{name}: {seconds:.2f} s for float32's answers, agreement {entry['agreement']['tokens']:.1%} of "
            f"{total} tokens ({entry['agreement']['identical_answers']} of {len(reference)} answers identical)"
        )
    chosen = choose_setting(measurements)
    measured_files = model_files_identity(model_id, original_config)
    if identity is not None and measured_files != identity:
        raise ValueError(
            f"{model_id}: its files changed while they were measured (each setting loads them again); nothing was "
            "recorded. Measure again when they no longer change."
        )
    identity = measured_files
    record = {
        "model": identity,
        "model_id": str(model_id),
        "machine": machine_identity(device),
        "choice": {"dtype": chosen["dtype"], "quantization": chosen["quantization"], "setting": chosen["setting"]},
        "rule": {"agreement": AGREEMENT_RULE, "speed_margin": SPEED_MARGIN},
        "prompt": prompt,
        "new_tokens": new_tokens,
        "audio": [clip for clip, _ in clips],
        "measurements": measurements,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "version": __version__,
    }
    if identity is None:
        report("the model's files could not be identified: the choice is printed, not recorded")
    else:
        record["path"] = str(write_record(record, cache_dir))
    return record


__all__ = ["DEFAULT_PROMPT", "measure_fast_settings", "reference_clips"]
