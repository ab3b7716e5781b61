"""Configuration of Audio Flamingo 2: HTSAT audio tower, audio transformer, Qwen2 LM with gated cross-attention."""

from huggingface_hub.dataclasses import strict
from transformers import ClapAudioConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig


@strict
class AudioFlamingo2Config(PreTrainedConfig):
    r"""
    Configuration of [`AudioFlamingo2ForConditionalGeneration`].

    Every number the original implementation hid in constructor defaults is a field here, so that a checkpoint's
    config describes the model completely.

    Args:
        audio_config (`ClapAudioConfig` or `dict`):
            The HTSAT audio tower (AF-CLAP). Its output width, `patch_embeds_hidden_size * 2 ** (len(depths) - 1)`,
            is the width of the audio transformer and of the cross-attention keys/values.
        text_config (`Qwen2Config` or `dict`):
            The Qwen2 language model, with `vocab_size` equal to the tokenizer's length (AF2's tokens included).
        audio_transformer_num_layers (`int`, defaults to 3):
            Post-norm encoder layers run over the concatenated window tokens of each sample.
        audio_transformer_num_heads (`int`, defaults to 8):
            Attention heads of the audio transformer. Not recoverable from the weights (all projections are square).
        audio_transformer_intermediate_size (`int`, defaults to 2048):
            Hidden width of the audio transformer's ReLU feed-forward.
        audio_transformer_rotary_dim (`int`, *optional*):
            Leading head dimensions that receive the rotary embedding; defaults to `max(head_dim // 2, 32)` as in the
            original. The remaining head dimensions pass through unrotated.
        audio_transformer_rope_theta (`float`, defaults to 4096.0):
            Base of the audio transformer's rotary frequencies.
        audio_transformer_layer_norm_eps (`float`, defaults to 1e-6):
            Epsilon of the audio transformer's LayerNorms.
        cross_attention_every_n_layers (`int`, defaults to 1):
            A gated cross-attention block sits before decoder layer `i` when `(i + 1) % n == 0`. Used only to derive
            `cross_attention_layers` when that is not given.
        cross_attention_layers (`list[int]`, *optional*):
            0-based indices of the decoder layers preceded by a gated cross-attention block.
        cross_attention_num_heads (`int`, defaults to 8):
            Heads of each cross-attention block.
        cross_attention_head_dim (`int`, defaults to 64):
            Width of each cross-attention head (inner width = heads * head_dim).
        cross_attention_ff_mult (`int`, defaults to 4):
            Multiplier of the gated feed-forward's hidden width over the LM hidden size.
        cross_attention_layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the LayerNorms inside the cross-attention blocks.
        audio_token_id (`int`): id of `<audio>`.
        end_of_chunk_token_id (`int`): id of `<|endofchunk|>`, which ends every training answer.
        sep_token_id (`int`): id of `<SEP>`, which separates the question from the answer.
        pad_token_id (`int`): id of `<|PAD_TOKEN|>`.
        eos_token_id (`int`): id of `<|endoftext|>`; generation stops there.
    """

    model_type = "audioflamingo2"
    # What Trainer.evaluate/predict leave out of the predictions: the cache (under either name transformers has used)
    # and the audio embeddings, so `compute_metrics` receives the logits alone.
    keys_to_ignore_at_inference = ["past_key_values", "cache", "audio_embeds"]
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=ClapAudioConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None

    audio_transformer_num_layers: int = 3
    audio_transformer_num_heads: int = 8
    audio_transformer_intermediate_size: int = 2048
    audio_transformer_rotary_dim: int | None = None
    audio_transformer_rope_theta: float = 4096.0
    audio_transformer_layer_norm_eps: float = 1e-6

    cross_attention_every_n_layers: int = 1
    cross_attention_layers: list[int] | None = None
    cross_attention_num_heads: int = 8
    cross_attention_head_dim: int = 64
    cross_attention_ff_mult: int = 4
    cross_attention_layer_norm_eps: float = 1e-5

    audio_token_id: int = 151665
    end_of_chunk_token_id: int = 151666
    pad_token_id: int | None = 151667
    sep_token_id: int = 151668
    eos_token_id: int | list[int] | None = 151643

    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.cross_attention_layers is None:
            num_layers = self.text_config.num_hidden_layers
            every = self.cross_attention_every_n_layers
            self.cross_attention_layers = [i for i in range(num_layers) if (i + 1) % every == 0]
        if self.audio_transformer_rotary_dim is None:
            head_dim = self.audio_hidden_size // self.audio_transformer_num_heads
            self.audio_transformer_rotary_dim = max(head_dim // 2, 32)
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def validate_architecture(self):
        """Checks that the sub-configs and the AF2 fields describe one consistent model."""
        audio_dim = self.audio_hidden_size
        if audio_dim % self.audio_transformer_num_heads != 0:
            raise ValueError(
                f"audio_transformer_num_heads={self.audio_transformer_num_heads} must divide the audio tower's "
                f"output width {audio_dim}."
            )
        head_dim = audio_dim // self.audio_transformer_num_heads
        rotary_dim = self.audio_transformer_rotary_dim
        if rotary_dim is not None and (rotary_dim % 2 != 0 or rotary_dim > head_dim):
            raise ValueError(
                f"audio_transformer_rotary_dim={rotary_dim} must be even and at most the audio transformer's head "
                f"width {head_dim} (audio width {audio_dim} / {self.audio_transformer_num_heads} heads)."
            )
        num_layers = self.text_config.num_hidden_layers
        bad = [i for i in self.cross_attention_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"cross_attention_layers has indices {bad} outside the language model's {num_layers} layers."
            )
        if self.cross_attention_every_n_layers < 1:
            raise ValueError(
                f"cross_attention_every_n_layers must be >= 1, got {self.cross_attention_every_n_layers}."
            )

    @property
    def audio_hidden_size(self) -> int:
        """Width of the audio tower's tokens: the last Swin stage's channels."""
        return int(self.audio_config.patch_embeds_hidden_size * 2 ** (len(self.audio_config.depths) - 1))

    @property
    def audio_tokens_per_window(self) -> int:
        """Tokens the HTSAT tower emits per window (64 for the released shape: 2 frequency groups x 32 steps)."""
        cfg = self.audio_config
        stride = cfg.patch_stride if isinstance(cfg.patch_stride, (list, tuple)) else (cfg.patch_stride,) * 2
        downsample = 2 ** (len(cfg.depths) - 1)
        # The mel is reshaped into a spec_size x spec_size image before the patch embedding.
        return (cfg.spec_size // downsample // stride[0]) * (cfg.spec_size // downsample // stride[1])


__all__ = ["AudioFlamingo2Config"]
