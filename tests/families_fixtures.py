"""Tiny random Audio Flamingo 3 and Music Flamingo checkpoints, built offline from transformers' own configs the way
transformers' tests build theirs, with a processor as the released checkpoints' conversion scripts write it (the
Whisper front end, the family's chat template and special tokens) around a small byte-level BPE tokenizer."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>", "<|sound_bos|>", "<|sound_eos|>"]
VOCAB_SIZE = 320
PAD_ID, IM_START_ID, IM_END_ID, SOUND_ID, SOUND_BOS_ID, SOUND_EOS_ID = range(6)

# The processor chat template of transformers' convert_audioflamingo3_to_hf.py / convert_musicflamingo_to_hf.py,
# with the system prompt given.
_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nSYSTEM<|im_end|>\n{% endif %}"
    "{% for m in messages if m['content'] is not none %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set audio = namespace(found=False) %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM_PROMPTS = {
    "audioflamingo3": "You are a helpful assistant.",
    "musicflamingo": "You are Music Flamingo, a multimodal assistant for language and music.",
}


def tiny_tokenizer():
    """A byte-level BPE tokenizer (Qwen2-style: no BOS, `<|endoftext|>` pads, `<|im_end|>` ends a turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [
        "You are a helpful assistant. Describe the audio. What is the sound in this audio? Music Flamingo",
        "Choose the correct option among the options below: dog bark, siren, piano, guitar, rain.",
    ] * 8
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_processor(model_type: str = "audioflamingo3"):
    from transformers import AudioFlamingo3Processor, MusicFlamingoProcessor, WhisperFeatureExtractor

    processor_class = {"audioflamingo3": AudioFlamingo3Processor, "musicflamingo": MusicFlamingoProcessor}[model_type]
    return processor_class(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=tiny_tokenizer(),
        chat_template=_CHAT_TEMPLATE.replace("SYSTEM", SYSTEM_PROMPTS[model_type]),
    )


def tiny_config(model_type: str = "audioflamingo3", audio: dict | None = None, text: dict | None = None):
    """Small audio encoder (the real 128 mel bins and 1500 positions: a 30 s window) and a 2-layer Qwen2; the text
    config's `layer_types` left out so it has one entry per layer. `audio` / `text` override sub-config values."""
    from transformers import AudioFlamingo3Config, MusicFlamingoConfig

    audio_config = dict(
        model_type="audioflamingo3_encoder",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_mel_bins=128,
        max_source_positions=1500,
    )
    text_config = dict(
        model_type="qwen2",
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=IM_END_ID,
        pad_token_id=PAD_ID,
    )
    audio_config.update(audio or {})
    text_config.update(text or {})
    if model_type == "audioflamingo3":
        return AudioFlamingo3Config(audio_config=audio_config, text_config=text_config, audio_token_id=SOUND_ID)
    return MusicFlamingoConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_id=SOUND_ID,
        audio_bos_token_id=SOUND_BOS_ID,
        audio_eos_token_id=SOUND_EOS_ID,
        rope_parameters={"rope_type": "default", "rope_theta": 1200},
    )


def tiny_model(model_type: str = "audioflamingo3", seed: int = 0):
    """A random tiny model in eval mode, float32. transformers' default init (std 0.02) leaves the top logits nearly
    tied at every step, so every weight matrix is scaled up: greedy choices then have clear margins and a batched
    run can be compared to one-at-a-time runs token for token."""
    from transformers import (
        AudioFlamingo3ForConditionalGeneration,
        GenerationConfig,
        MusicFlamingoForConditionalGeneration,
    )

    model_class = {
        "audioflamingo3": AudioFlamingo3ForConditionalGeneration,
        "musicflamingo": MusicFlamingoForConditionalGeneration,
    }[model_type]
    torch.manual_seed(seed)
    model = model_class(tiny_config(model_type)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "embed_positions" not in name:
                parameter.mul_(8.0 if "language_model" in name or "projector" in name else 2.0)
        model.lm_head.weight.mul_(4.0)
    # As the released checkpoints' conversion writes it: stop at <|im_end|> (or <|endoftext|>), pad with the latter.
    model.generation_config = GenerationConfig(
        eos_token_id=[IM_END_ID, PAD_ID], pad_token_id=PAD_ID, max_new_tokens=8, do_sample=False
    )
    return model


def save_tiny_checkpoint(folder, model_type: str = "audioflamingo3", seed: int = 0):
    """Writes a tiny checkpoint (config.json, weights, processor) to `folder`, as `save_pretrained` does."""
    model, processor = tiny_model(model_type, seed), tiny_processor(model_type)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def noise_clip(path, seconds: float, seed: int, rate: int = 16000):
    """A white-noise clip of `seconds` (float32 WAV)."""
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal(int(seconds * rate)) * 0.1).astype("float32"), rate)
    return path
