"""`caption()`, what `af2 caption` runs: answer prompts about many clips into a JSONL/Parquet/CSV file, resumably and
on many processes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..runstore import RunStore, model_fingerprint, package_versions
from ..utils import DEFAULT_TOP_K, DEFAULT_TOP_P
from .inputs import AUDIO_EXTENSIONS, DatasetAudio, discover_clips

if TYPE_CHECKING:
    from .engine import RunSummary

DEFAULT_BATCH_SIZE = 8
DEFAULT_NUM_WORKERS = 2


def generation_settings(model, max_new_tokens=None, do_sample=False, top_k=None, top_p=None, temperature=None):
    """The `generate` arguments of a run, with the model's defaults filled in so the sidecar says what was used."""
    from ..families import family_class

    if not do_sample and any(v is not None for v in (top_k, top_p, temperature)):
        raise ValueError("top_k, top_p and temperature (--top-k, --top-p, --temperature) apply to sampling only.")
    settings = {
        "max_new_tokens": max_new_tokens or family_class(model.config.model_type).default_max_new_tokens(model),
        "do_sample": bool(do_sample),
        "num_beams": 1,
    }
    if do_sample:
        settings.update(top_k=top_k or DEFAULT_TOP_K, top_p=DEFAULT_TOP_P if top_p is None else top_p)
        if temperature is not None:
            settings["temperature"] = temperature
    return settings


def caption(
    inputs,
    output: str | os.PathLike,
    *,
    prompts: list[str] | str | None = None,
    model="nvidia/audio-flamingo-2",
    processor=None,
    config: str | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    fast: bool = False,
    quantization: str | None = None,
    num_workers: int = DEFAULT_NUM_WORKERS,
    lookahead: int | None = None,
    progress: bool | None = None,
    dataset: bool = False,
    split: str | None = None,
    audio_column: str = "audio",
    path_column: str | None = None,
    id_column: str | None = None,
    prompt_column: str | None = None,
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
    overwrite: bool = False,
) -> RunSummary:
    """
    Answers every prompt about every clip of `inputs` and writes one row per (clip, prompt) to `output`.

    Run it again with the same arguments after an interruption (even kill -9) and it continues where it stopped;
    with more inputs or prompts and it adds their rows. Under `torchrun` or `accelerate launch` each process takes
    its share of the clips. See `af2 caption --help` for the inputs, the row fields and the files next to `output`.

    Args:
        inputs: a path or a list of them: audio files, folders, `.txt` lists, CSV/TSV/JSONL/Parquet manifests,
            saved `datasets` folders (or, with `dataset=True`, anything `datasets.load_dataset` takes).
        output: `.jsonl` (default), `.parquet` or `.csv`. It must be af2's: a file af2 did not write (or that was
            changed since), an input of the run or a folder is refused; a second run into it while one is on is
            refused; a resume with another model, dtype, settings or versions is refused (see `runstore`).
        overwrite: start anew, replacing whatever is at `output` (never an input of the run).
        prompts: the questions asked about every clip (a clip with its own manifest prompt is asked that one).
        model: model id or directory (see `load_model_and_processor`), or a loaded AF2 model with `processor`.
        dtype, device: as in `af2 generate` (`auto`: bfloat16 on GPU, float32 on CPU); under torchrun "auto" and
            "cuda" mean the process's own GPU, `cuda:LOCAL_RANK`.
        fast, quantization: as `af2 generate --fast` / `--quantization` (`loading.model_loading_options`); the
            quantization is part of the run's recorded model.
        Others: see `af2 caption --help`.

    Returns:
        `RunSummary`: rows done, failed and skipped as already done (over all processes).
    """
    import torch

    from ..loading import load_model_and_processor, model_loading_options, resolve_device
    from ..utils import set_seed
    from .engine import ProcessGroup, jobs_for_clips, run_generation_jobs

    with ProcessGroup() as processes:
        inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        blank = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if blank:
            raise ValueError(f"--prompt {blank[0]!r}: a prompt must hold a question (af2 generate refuses it too).")
        clips = discover_clips(
            inputs,
            extensions=extensions,
            dataset=dataset,
            split=split,
            audio_column=audio_column,
            path_column=path_column,
            id_column=id_column,
            prompt_column=prompt_column,
        )
        if not clips:
            raise ValueError(f"no clips found in {[str(i) for i in inputs]}.")
        jobs = jobs_for_clips(clips, prompts)

        if isinstance(model, (str, os.PathLike)):
            model_id = str(model)
            resolved_device = resolve_device(device)
            if resolved_device.type == "cuda" and resolved_device.index is None and processes.world_size > 1:
                resolved_device = torch.device("cuda", processes.local_rank)  # one GPU per process of the node
            model, processor = load_model_and_processor(
                model_id,
                device=resolved_device,
                original_config=config,
                **model_loading_options(resolved_device, dtype, fast, quantization, model_id, config),
            )
        else:
            if processor is None:
                raise ValueError("caption(model=<loaded model>) needs its processor too: pass processor=.")
            if config is not None:
                raise ValueError("caption(model=<loaded model>) takes no config: it is for loading an original-layout "
                                 "checkpoint by id.")  # fmt: skip
            model_id = model.name_or_path
        generate_kwargs = generation_settings(model, max_new_tokens, do_sample, top_k, top_p, temperature)
        # A directory is recorded by its resolved path, so that a rerun from another folder matches.
        settings = {"model": model_fingerprint(model, model_id, config), "generation": generate_kwargs}
        if do_sample and seed is not None:
            settings["seed"] = seed
        if seed is not None:
            set_seed(seed + processes.rank)
        # Every file the run reads, so that the output can never be one of them.
        read = [str(i) for i in inputs if os.path.isfile(os.path.expanduser(str(i)))]
        read += [clip.audio for clip in clips if not isinstance(clip.audio, DatasetAudio)]
        store = RunStore(output, inputs=read, overwrite=overwrite)
        return run_generation_jobs(
            jobs,
            model,
            processor,
            store,
            settings=settings,
            versions=package_versions(),
            generate_kwargs=generate_kwargs,
            batch_size=batch_size,
            lookahead=lookahead,
            num_workers=num_workers,
            progress=progress,
            processes=processes,
        )
