"""The HTSAT tower alone: the original's `HTSAT_Swin_Transformer` class (from a checkout of NVIDIA/audio-flamingo,
branch audio_flamingo_2) and this package's tower, the same weights (`export_tower_state_dict`), the same log-mel
windows, in THIS environment, so that the code is compared under one torch. Times the part after the mel (batch
norm, image reshape, Swin layers) and compares the outputs; variants run interleaved, round by round.

The original's `htsat.py` imports torchlibrosa (its mel extractors, which this comparison does not call) and a
`utils` module that imports torchvision and h5py, of which it uses `interpolate` only: stand-ins are given for
those imports; nothing that the timed part computes is replaced.

    python benchmarks/tower_side_by_side.py --original-repo /path/to/audio-flamingo --windows 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import build_config  # noqa: E402

from transformers_af2.convert.export import export_tower_state_dict  # noqa: E402
from transformers_af2.modeling.cpu_linear import LinearKernels, use_linear_kernels  # noqa: E402
from transformers_af2.modeling.modeling_audioflamingo2 import AudioFlamingo2AudioTower  # noqa: E402

PACKAGES = ("my_laion_clap", "my_laion_clap.CLAP", "my_laion_clap.CLAP.src", "my_laion_clap.CLAP.src.laion_clap",
            "my_laion_clap.CLAP.src.laion_clap.clap_module")  # fmt: skip


class _NotCalled(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()


def _interpolate(x, ratio):  # the original utils.interpolate
    batch, steps, classes = x.shape
    return x[:, :, None, :].repeat(1, 1, ratio, 1).reshape(batch, steps * ratio, classes)


def import_original_htsat(original_repo: Path):
    directory = original_repo / "inference_HF_pretrained"
    stft, augmentation = types.ModuleType("torchlibrosa.stft"), types.ModuleType("torchlibrosa.augmentation")
    stft.Spectrogram = stft.LogmelFilterBank = augmentation.SpecAugmentation = _NotCalled
    utils = types.ModuleType(PACKAGES[-1] + ".utils")
    utils.interpolate, utils.do_mixup = _interpolate, None
    sys.modules.update({"torchlibrosa": types.ModuleType("torchlibrosa"), "torchlibrosa.stft": stft,
                        "torchlibrosa.augmentation": augmentation, utils.__name__: utils})  # fmt: skip
    for name in PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(directory / Path(*name.split(".")))]
        sys.modules[name] = package
    from my_laion_clap.CLAP.src.laion_clap.clap_module import htsat

    return htsat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", type=Path, required=True)
    parser.add_argument("--shape", default="af2-0.5b")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    htsat = import_original_htsat(args.original_repo.resolve())
    ours = AudioFlamingo2AudioTower(build_config(args.shape).audio_config).eval()
    tower = ours.config
    mel_config = types.SimpleNamespace(sample_rate=16000, window_size=1024, hop_size=160, mel_bins=tower.num_mel_bins,
                                       fmin=50, fmax=8000, class_num=527)  # fmt: skip
    original = htsat.HTSAT_Swin_Transformer(
        spec_size=tower.spec_size, patch_size=tower.patch_size, patch_stride=tuple(tower.patch_stride),
        num_classes=527, embed_dim=tower.patch_embeds_hidden_size, depths=tower.depths,
        num_heads=tower.num_attention_heads, window_size=tower.window_size, config=mel_config, enable_fusion=True,
        fusion_type="aff_2d",
    ).eval()  # fmt: skip
    # strict=False: the fusion branch (mel_conv2d, fusion_model) serves windows longer than 10 s only; AF2 has none.
    original.load_state_dict(export_tower_state_dict(ours.state_dict()), strict=False)
    onednn = AudioFlamingo2AudioTower(tower).eval()
    onednn.load_state_dict(ours.state_dict())
    use_linear_kernels(onednn, LinearKernels(many_rows="onednn"))

    def run_original(mel):  # the original's forward after the mel, fusion model with no longer window
        x = original.bn0(mel.unsqueeze(1).transpose(1, 3)).transpose(1, 3)
        return original.forward_features(original.reshape_wav2img(x), longer_idx=[])

    def run(tower_module, mel, per_call):
        out = torch.cat([tower_module(chunk.unsqueeze(1)).last_hidden_state for chunk in mel.split(per_call)])
        return out.flatten(2).transpose(1, 2)

    torch.manual_seed(0)
    mel = torch.randn(args.windows, 1001, tower.num_mel_bins) * 10 - 40
    variants = {
        "original (all windows per call)": lambda m: run_original(m),
        "ours (1 window per call)": lambda m: run(ours, m, 1),
        "ours (all windows per call)": lambda m: run(ours, m, len(m)),
        "ours, oneDNN linears (1 window per call)": lambda m: run(onednn, m, 1),
    }
    with torch.no_grad():
        reference = run_original(mel[:2])
        differences = {name: float((f(mel[:2]) - reference).abs().max()) for name, f in list(variants.items())[1:]}
        print(json.dumps({"max_abs_diff_vs_original": differences}), flush=True)
        times = {name: [] for name in variants}
        for round_index in range(args.rounds):
            order = list(variants.items())
            for name, f in order if round_index % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                f(mel)
                times[name].append(round(time.perf_counter() - start, 3))
    print(
        json.dumps(
            {"torch": torch.__version__, "threads": args.threads, "windows": args.windows, "seconds": times}, indent=1
        )
    )


if __name__ == "__main__":
    main()
