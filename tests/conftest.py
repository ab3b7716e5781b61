"""Shared test helpers: the parity fixtures beside the checkout, tiny random AF2 configs, and `af2` commands run as
servers in their own process."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_ROOT = REPO_ROOT.parent / "shared" / "parity"
FIXTURE_DIRS = sorted(p for p in PARITY_ROOT.glob("fixture_*") if (p / "reference.json").is_file())


def fixture_params():
    """One pytest param per parity fixture; a single skipped param when none is present."""
    if not FIXTURE_DIRS:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no parity fixture under {PARITY_ROOT}"))]
    return [pytest.param(path, id=path.name) for path in FIXTURE_DIRS]


def write_original_config(fixture_dir: Path, destination: Path) -> Path:
    """The fixture's hyper-parameters in the original's configs/inference.yaml format, as a user would pass them."""
    reference = json.loads((fixture_dir / "reference.json").read_text())
    config = {
        "clap_config": reference["clap_config"],
        "model_config": {
            "cross_attn_every_n_layers": reference["xattn_every"],
            "audio_transformer_kwargs": reference["audio_transformer"],
            "lang_encoder_path": str(fixture_dir / "base_lm_config.json"),
            "tokenizer_path": str(fixture_dir / "base_tokenizer"),
        },
    }
    destination.write_text(yaml.safe_dump(config))
    return destination


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_af2_command(args, log_path: Path, ready_url: str, timeout: float, env=None):
    """
    `python -m transformers_af2 *args` in its own process (one thread, output to `log_path`). Waits until
    `ready_url` answers; fails the test with the end of the log if the process exits first or `timeout` seconds pass.
    Yields the process and stops it on exit.
    """
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "transformers_af2", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"af2 {args[0]} did not start (exit status {process.poll()}):\n{log_path.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ConvertedFixture:
    """A parity fixture converted once: the saved repo, its reference tensors and metadata."""

    def __init__(self, fixture_dir: Path, work_dir: Path):
        from safetensors.torch import load_file

        from transformers_af2.convert import convert_checkpoint

        self.fixture_dir = fixture_dir
        self.reference = json.loads((fixture_dir / "reference.json").read_text())
        self.tensors = load_file(fixture_dir / "reference.safetensors")
        self.yaml_path = write_original_config(fixture_dir, work_dir / "inference.yaml")
        self.repo = work_dir / "converted"
        convert_checkpoint(fixture_dir / "original", self.repo, config=self.yaml_path)

    def wav(self, index: int) -> Path:
        return self.fixture_dir / "audio" / self.reference["audio_files"][index]

    def ids(self, key: str) -> torch.Tensor:
        tensor = self.tensors[key]
        return tensor.unsqueeze(0) if tensor.ndim == 1 else tensor


@pytest.fixture(scope="session", params=fixture_params())
def converted_fixture(request, tmp_path_factory):
    return ConvertedFixture(request.param, tmp_path_factory.mktemp(request.param.name))


@pytest.fixture(scope="module")
def loaded(converted_fixture):
    """(fixture, converted model in eval mode, its processor), loaded once per test module."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(converted_fixture.repo).eval()
    processor = AutoProcessor.from_pretrained(converted_fixture.repo)
    return converted_fixture, model, processor


def tiny_config(**overrides):
    """A tiny AF2 config in the transformers test style: vocab 99, pad id != audio id, 3 LM layers."""
    from transformers_af2 import AudioFlamingo2Config

    values = dict(
        audio_config=dict(
            patch_embeds_hidden_size=8,
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 1, 2, 2],
            enable_fusion=False,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=99,
            max_position_embeddings=256,
            pad_token_id=97,
            eos_token_id=98,
        ),
        audio_transformer_num_heads=2,
        audio_transformer_num_layers=2,
        audio_transformer_intermediate_size=48,
        cross_attention_every_n_layers=2,
        cross_attention_num_heads=2,
        cross_attention_head_dim=8,
        audio_token_id=95,
        end_of_chunk_token_id=96,
        pad_token_id=97,
        sep_token_id=94,
        eos_token_id=98,
    )
    values.update(overrides)
    return AudioFlamingo2Config(**values)


# `tiny_config` overrides that make every linear a multiple of 64 wide: bitsandbytes' CPU 4-bit packs blocks of 32
# outputs (`out_features % 32 == 0`), int4 weight-only groups of 32 inputs.
BLOCK_ALIGNED = dict(
    audio_config=dict(
        patch_embeds_hidden_size=64,
        depths=[1, 1, 1, 1],
        num_attention_heads=[2, 2, 2, 2],
        enable_fusion=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
    text_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=99,
        max_position_embeddings=256,
        pad_token_id=97,
        eos_token_id=98,
    ),
    audio_transformer_intermediate_size=64,
    cross_attention_num_heads=4,
    cross_attention_head_dim=16,
)


def tiny_model(seed: int = 0, nonzero_gates: bool = True, **overrides):
    """A random tiny model in eval mode; gates set non-zero so the audio actually changes the output."""
    from transformers_af2 import AudioFlamingo2ForConditionalGeneration

    torch.manual_seed(seed)
    model = AudioFlamingo2ForConditionalGeneration(tiny_config(**overrides)).eval()
    if nonzero_gates:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                if layer.cross_attn is not None:
                    layer.cross_attn.attn_gate.fill_(0.8)
                    layer.cross_attn.ff_gate.fill_(0.5)
    return model


def random_audio_inputs(window_counts, frames=1001, mels=64, seed=0):
    """input_features (B, max windows, frames, mels) and input_features_mask for the given per-sample counts."""
    generator = torch.Generator().manual_seed(seed)
    batch, widest = len(window_counts), max(window_counts)
    features = torch.zeros(batch, widest, frames, mels)
    mask = torch.zeros(batch, widest, dtype=torch.long)
    for row, count in enumerate(window_counts):
        features[row, :count] = torch.randn(count, frames, mels, generator=generator) * 20 - 40
        mask[row, :count] = 1
    return features, mask
