"""Model shapes of the benchmarks, random-weight models of those shapes, and their random inputs."""

from __future__ import annotations

import copy
import math

import torch

try:
    import transformers_af2  # noqa: F401  (registers AF2 with transformers' Auto classes)
except ModuleNotFoundError as error:
    if error.name != "transformers_af2":
        raise
    raise SystemExit(
        "The benchmarks measure the installed transformers_af2 package, which is not importable: run "
        "`pip install -e .` in the repository root first."
    ) from None

from transformers_af2 import AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration

# AF2's vocabulary: Qwen2.5's 151665 tokens plus <audio>, <|endofchunk|>, <|PAD_TOKEN|>, <SEP>.
AF2_VOCAB = 151669

HTSAT_LARGE = dict(
    patch_embeds_hidden_size=256,
    depths=[2, 2, 12, 2],
    num_attention_heads=[4, 8, 16, 32],
    window_size=8,
    spec_size=256,
    patch_size=4,
    patch_stride=[4, 4],
    num_mel_bins=64,
    mlp_ratio=4.0,
    qkv_bias=True,
    enable_patch_layer_norm=True,
    enable_fusion=False,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
    layer_norm_eps=1e-5,
)


def _qwen25(hidden, intermediate, layers, heads, kv_heads):
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=AF2_VOCAB,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        pad_token_id=151667,
        eos_token_id=151643,
    )


AF2_HEAD = dict(
    audio_transformer_num_layers=3,
    audio_transformer_num_heads=8,
    audio_transformer_intermediate_size=2048,
    cross_attention_every_n_layers=1,
    cross_attention_num_heads=8,
    cross_attention_head_dim=64,
    cross_attention_ff_mult=4,
)

SHAPES = {
    "af2-0.5b": dict(audio_config=HTSAT_LARGE, text_config=_qwen25(896, 4864, 24, 14, 2), **AF2_HEAD),
    "af2-3b": dict(audio_config=HTSAT_LARGE, text_config=_qwen25(2048, 11008, 36, 16, 2), **AF2_HEAD),
    "tiny": dict(
        audio_config=dict(
            HTSAT_LARGE, patch_embeds_hidden_size=16, depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 2, 4]
        ),
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            pad_token_id=998,
            eos_token_id=995,
        ),
        audio_transformer_num_layers=2,
        audio_transformer_num_heads=2,
        audio_transformer_intermediate_size=128,
        cross_attention_every_n_layers=1,
        cross_attention_num_heads=2,
        cross_attention_head_dim=16,
        cross_attention_ff_mult=4,
        audio_token_id=996,
        end_of_chunk_token_id=997,
        pad_token_id=998,
        sep_token_id=999,
        eos_token_id=995,
    ),
}

# Audio lengths (seconds) the items measure; AF2 encodes audio in windows of 10 s.
AUDIO_SECONDS = (10, 30, 120)
WINDOW_SECONDS = 10
BATCH_AUDIO_SECONDS = (10, 30, 60, 120)
BATCH_PROMPT_TOKENS = (12, 16, 20, 24)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weights_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the (deduplicated, so tied counted once) parameters, in `dtype` or their own dtype."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(p.numel() * (size or p.element_size()) for p in module.parameters())


def build_config(shape: str, layers: int | None = None):
    """The config of a named shape; `layers` replaces its language model's depth (the widths stay the shape's)."""
    values = copy.deepcopy(SHAPES[shape])
    if layers is not None:
        values["text_config"]["num_hidden_layers"] = layers
    return AudioFlamingo2Config(**values)


def build_random_model(shape: str, dtype: torch.dtype, device: torch.device, layers: int | None = None):
    torch.manual_seed(0)
    model = AudioFlamingo2ForConditionalGeneration(build_config(shape, layers))
    with torch.no_grad():
        # Non-zero gates, as in a trained model (timing does not depend on it, the outputs do).
        for layer in model.model.language_model.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.attn_gate.fill_(0.5)
                layer.cross_attn.ff_gate.fill_(0.5)
    return model.to(device=device, dtype=dtype).eval()


def bare_language_model(config, dtype: torch.dtype, device: torch.device):
    """`Qwen2ForCausalLM` of the AF2 model's text config: the floor of a decoding step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = config.text_config.to_dict()
    text.pop("model_type", None)
    text.pop("transformers_version", None)
    torch.manual_seed(1)
    lm = Qwen2ForCausalLM(Qwen2Config(**text))
    return lm.to(device=device, dtype=dtype).eval()


def audio_features(seconds_per_sample, device: torch.device, seed: int = 0, frames: int = 1001, mels: int = 64):
    """Random log-mel windows like the feature extractor's (dB around -40) and the window mask, left-aligned."""
    generator = torch.Generator().manual_seed(seed)
    windows = [max(1, math.ceil(s / WINDOW_SECONDS)) for s in seconds_per_sample]
    features = torch.zeros(len(windows), max(windows), frames, mels)
    mask = torch.zeros(len(windows), max(windows), dtype=torch.long)
    for row, count in enumerate(windows):
        features[row, :count] = torch.randn(count, frames, mels, generator=generator) * 20 - 40
        mask[row, :count] = 1
    return features.to(device), mask.to(device)


def prompts(lengths, config, device: torch.device, seed: int = 0):
    """Left-padded prompts `<audio> question <SEP>` of random text tokens, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    specials = {config.audio_token_id, config.sep_token_id, config.pad_token_id, config.end_of_chunk_token_id}
    text_vocab = min(config.text_config.vocab_size, min(specials), 151643)
    width = max(lengths)
    ids = torch.full((len(lengths), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length] = config.audio_token_id
        ids[row, width - length + 1 : width - 1] = torch.randint(0, text_vocab, (length - 2,), generator=generator)
        ids[row, width - 1] = config.sep_token_id
        mask[row, width - length :] = 1
    return ids.to(device), mask.to(device)


def parameter_breakdown(model) -> dict:
    inner = model.model
    cross_all = cross_step = 0
    for layer in inner.language_model.layers:
        if layer.cross_attn is not None:
            cross_all += count_params(layer.cross_attn)
            # kv_proj runs once per generate (the audio K/V are cached); the rest runs at every step.
            cross_step += count_params(layer.cross_attn) - count_params(layer.cross_attn.kv_proj)
    language_model = count_params(inner.language_model) - cross_all
    lm_head = 0 if model.config.tie_word_embeddings else count_params(model.lm_head)
    return {
        "total": count_params(model),
        "audio_tower": count_params(inner.audio_tower),
        "audio_transformer": count_params(inner.audio_transformer),
        "language_model": language_model + lm_head,
        "cross_attention": cross_all,
        "cross_attention_per_step": cross_step,
    }
