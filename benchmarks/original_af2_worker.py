"""Runs NVIDIA's original Audio Flamingo 2 inference code for `original_side_by_side.py`, in the original's own Python
environment (its torch and transformers differ from this package's). Not part of this package: nothing here imports
it, and none of the original's code is copied here; the worker imports the original from `--original-repo`.

Protocol: the parent writes one JSON request per line on stdin; the worker answers each with one JSON line on stdout
(everything else the original prints goes to stderr). Requests:
    {"op": "generate", "audio": WAV, "prompt_ids": [...], "new_tokens": N, "min_new_tokens": bool,
     "scores_out": PATH or null}
        the original's own audio loading (`inference.load_audio`) then `Flamingo.generate`, greedy; answers the
        seconds to the first logits (`prefill_s`, audio loading included), the seconds of each following decoding
        step (`step_s`), the ids (prompt + generated), and the cores other processes kept busy meanwhile
    {"op": "quit"}

The original needs a few adjustments to run here; each leaves its computation as it is:
- its tower's package `__init__`s import CLAP's training code, which downloads `bert-base-uncased` at import time: the
  HTSAT module is imported without running them (stand-in package modules);
- on a host without CUDA, the CLAP wrapper's move to `cuda:<current device>` in its constructor is skipped (the whole
  model is moved to `--device` afterwards, as `inference.py` does with `device_id`);
- the base LM is built from its config instead of downloaded: every one of its weights is then overwritten by
  `safe_ckpt` (the load reports what it did not fill);
- shapes the original hard-codes (HTSAT "large", cross-attention 8 heads x 64) come from the setup file when the
  measured model has others (the `tiny` smoke shape, the parity fixture);
- `clap_ckpt/epoch_16.pt` of the hub holds a numpy float64 scalar, which torch's safe loading must be told about.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measurement import busy_cpu_seconds, own_cpu_seconds  # noqa: E402  (stdlib + torch only)

HTSAT_LARGE = {"embed_dim": 256, "depths": [2, 2, 12, 2], "num_heads": [4, 8, 16, 32], "window_size": 8}
CROSS_ATTENTION_DEFAULT = {"heads": 8, "dim_head": 64}
TOWER_PACKAGES = ("my_laion_clap.CLAP.src.laion_clap", "my_laion_clap.CLAP.src.laion_clap.clap_module")


def inference_dir(original_repo: Path) -> Path:
    for candidate in (original_repo / "inference_HF_pretrained", original_repo):
        if (candidate / "src" / "factory.py").is_file() and (candidate / "inference.py").is_file():
            return candidate
    raise SystemExit(
        f"--original-repo {original_repo}: no inference_HF_pretrained/src/factory.py there; pass a checkout of "
        "NVIDIA/audio-flamingo at branch audio_flamingo_2."
    )


def import_original(directory: Path):
    """(factory module, flamingo_lm module, htsat module, inference module) of the original, imported from
    `directory` with the tower's package `__init__`s skipped."""
    sys.path.insert(0, str(directory))
    for name in TOWER_PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(directory / Path(*name.split(".")))]
        sys.modules[name] = package
    import inference  # noqa: F401  (the original's audio loading)
    import src.factory as factory
    import src.flamingo_lm as flamingo_lm
    from my_laion_clap.CLAP.src.laion_clap.clap_module import htsat

    return factory, flamingo_lm, htsat, inference


class LanguageModelFromConfig:
    """Stands for `AutoModelForCausalLM` in the original's factory: the LM of `path`'s config, random weights."""

    @staticmethod
    def from_pretrained(path, **_):
        from transformers import AutoConfig, AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def _skip_cuda_moves(to):
    @functools.wraps(to)
    def move(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return self
        return to(self, *args, **kwargs)

    return move


def build_original_model(setup: dict, factory, flamingo_lm, htsat, device: torch.device):
    dims = setup["htsat"]
    if {k: dims[k] for k in HTSAT_LARGE} != HTSAT_LARGE or "class_num" in dims:

        def create_htsat_model(audio_cfg, enable_fusion=False, fusion_type="None"):
            return htsat.HTSAT_Swin_Transformer(
                spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=dims.get("class_num", audio_cfg.class_num),
                embed_dim=dims["embed_dim"], depths=dims["depths"], num_heads=dims["num_heads"],
                window_size=dims["window_size"], config=audio_cfg, enable_fusion=enable_fusion,
                fusion_type=fusion_type,
            )  # fmt: skip

        factory.create_htsat_model = create_htsat_model
    if setup["cross_attention"] != CROSS_ATTENTION_DEFAULT:
        flamingo_lm.GatedCrossAttentionBlock = functools.partial(
            flamingo_lm.GatedCrossAttentionBlock, **setup["cross_attention"]
        )
    factory.AutoModelForCausalLM = LanguageModelFromConfig
    core = getattr(np, "_core", None) or np.core
    torch.serialization.add_safe_globals([core.multiarray.scalar, np.dtype, type(np.dtype("float64"))])

    saved_to, saved_current = torch.nn.Module.to, torch.cuda.current_device
    if not torch.cuda.is_available():
        torch.nn.Module.to = _skip_cuda_moves(saved_to)
        torch.cuda.current_device = lambda: 0
    try:
        model, tokenizer = factory.create_model_and_transforms(
            **setup["model_config"], clap_config=setup["clap_config"], use_local_files=True,
            gradient_checkpointing=False, freeze_lm_embeddings=False,
        )  # fmt: skip
    finally:
        torch.nn.Module.to, torch.cuda.current_device = saved_to, saved_current
    model = model.to(device).eval()

    # inference.py merges every chunk into one dict, then load_state_dict(strict=False); chunk by chunk is the same
    # load (the chunks' keys are disjoint) without holding a second copy of the weights.
    from safetensors.torch import load_file

    safe_ckpt = Path(setup["checkpoint"]) / "safe_ckpt"
    metadata = json.loads((safe_ckpt / "metadata.json").read_text())
    missing = {name for name, _ in model.named_parameters()}
    unexpected = []
    for chunk in metadata:
        tensors = load_file(safe_ckpt / f"{chunk}.safetensors")
        result = model.load_state_dict(tensors, False)
        unexpected += result.unexpected_keys
        missing -= set(tensors)
        del tensors
    lm_params = {f"lang_encoder.{n}" for n, _ in model.lang_encoder.named_parameters()}
    lm_missing = sorted(k for k in missing & lm_params if not k.startswith("lang_encoder.old_decoder_blocks.")
                        and not k.startswith("lang_encoder.gated_cross_attn_layers_sound."))  # fmt: skip
    if unexpected or lm_missing:
        raise SystemExit(f"safe_ckpt does not fit the original model: unexpected {unexpected[:10]}, "
                         f"LM parameters not filled {lm_missing[:10]}")  # fmt: skip
    return model, tokenizer


class StepClock:
    """A logits processor that only notes when each step's logits are ready (and, if asked, keeps them)."""

    def __init__(self, keep_scores: bool):
        self.times, self.scores, self.keep_scores = [], [], keep_scores

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if self.keep_scores:
            self.scores.append(scores[0].detach().float().cpu().clone())
        return scores


def timed_generation(request: dict, generate, device: torch.device) -> dict:
    """One greedy generation for `request`, timed; shared by both sides so they are timed alike. `generate(logits_processor,
    extra_kwargs)` runs the side's own path from the audio file and returns (ids of prompt + generated, windows)."""
    from transformers import LogitsProcessorList

    clock = StepClock(keep_scores=bool(request.get("scores_out")))
    extra = {"min_new_tokens": request["new_tokens"]} if request.get("min_new_tokens") else {}
    busy, own = busy_cpu_seconds(), own_cpu_seconds()
    start = time.perf_counter()
    with torch.no_grad():
        output, windows = generate(LogitsProcessorList([clock]), extra)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    others = (busy_cpu_seconds() - busy - (own_cpu_seconds() - own)) / max(wall, 1e-9)
    if clock.keep_scores:
        np.save(request["scores_out"], torch.stack(clock.scores).numpy())
    return {
        "prefill_s": clock.times[0] - start,
        "step_s": [float(step) for step in np.diff(clock.times)],
        "wall_s": wall,
        "ids": output.tolist(),
        "windows": windows,
        "others_cores": max(0.0, others),
    }


def generate_original(request: dict, model, tokenizer, clap_config: dict, load_audio, device: torch.device) -> dict:
    """The original's path: `inference.load_audio` (file -> windows) and `Flamingo.generate`, greedy."""
    prompt = torch.tensor([request["prompt_ids"]], dtype=torch.long, device=device)

    def run(logits_processor, extra):
        clips, mask = load_audio(request["audio"], clap_config)
        output = model.generate(
            audio_x=clips.to(device).unsqueeze(0), audio_x_mask=mask.to(device).unsqueeze(0), lang_x=prompt,
            eos_token_id=tokenizer.eos_token_id, max_new_tokens=request["new_tokens"], do_sample=False, num_beams=1,
            logits_processor=logits_processor, **extra,
        )[0]  # fmt: skip
        return output, int(mask.shape[0])

    return timed_generation(request, run, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", required=True, type=Path)
    parser.add_argument("--setup", required=True, type=Path, help="JSON written by original_side_by_side.py")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    answer, sys.stdout = sys.stdout, sys.stderr  # the original prints; only answers go to the parent's pipe
    setup = json.loads(args.setup.read_text())
    directory = inference_dir(args.original_repo.resolve())
    os.chdir(directory)
    factory, flamingo_lm, htsat, inference = import_original(directory)
    model, tokenizer = build_original_model(setup, factory, flamingo_lm, htsat, device)
    import transformers

    ready = {
        "ready": True,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.lang_encoder.config._attn_implementation,
        "special_ids": {
            "eos": tokenizer.eos_token_id,
            "sep": tokenizer.sep_token_id,
            "audio": tokenizer.encode("<audio>")[-1],
            "pad": tokenizer.pad_token_id,
        },
        "vocab": len(tokenizer),
    }
    print(json.dumps(ready), file=answer, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        result = generate_original(request, model, tokenizer, setup["clap_config"], inference.load_audio, device)
        print(json.dumps(result), file=answer, flush=True)


if __name__ == "__main__":
    main()
