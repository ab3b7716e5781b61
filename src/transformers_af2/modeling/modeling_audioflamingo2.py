"""Audio Flamingo 2 in transformers: HTSAT tower -> audio transformer -> Qwen2 with gated cross-attention.

Data flow of one forward pass:

    input_features (B, W, frames, mels), input_features_mask (B, W)
      -> audio_tower (transformers' ClapAudioEncoder, run on the valid windows only)   (n_valid, T, D)
      -> audio_transformer over each sample's concatenated window tokens              (B, W*T, D)
      -> in every decoder layer listed in `config.cross_attention_layers`: the audio keys/values of that layer,
         computed once and kept in `AudioFlamingo2Cache`, are attended to by every text position before the
         unchanged Qwen2 decoder layer runs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ClapAudioConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clap.modeling_clap import ClapAudioAttention, ClapAudioEncoder, ClapAudioSelfAttention
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)
from transformers.utils import can_return_tuple, logging

from ..compat import CACHE_KWARG, LOADING_DEFAULTS, pop_cache
from ..generation_utils import honour_max_length, with_non_finite_check
from ..quantization import use_int8_cpu_kernel
from ..utils import non_finite_tensors
from .configuration_audioflamingo2 import AudioFlamingo2Config

logger = logging.get_logger(__name__)


class AudioFlamingo2Cache(DynamicCache):
    """
    A `DynamicCache` for the language model's self-attention that also holds, per cross-attention layer, the audio
    keys/values and the audio token mask. Takes `DynamicCache`'s arguments: `offloading=True` is what `generate`'s
    `cache_implementation="offloaded"` gives.

    The audio tokens do not change while a sequence is decoded, so their keys/values are projected once (at the
    first forward of a `generate` call) and read back at every later step. They follow every batch operation of the
    self-attention cache (beam reordering, batch expansion, batch selection), so each row keeps its own audio.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # layer index -> (keys (B, heads, N, head_dim), values (B, heads, N, head_dim), mask (B, N) bool)
        self.audio_states: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def has_audio(self) -> bool:
        return len(self.audio_states) > 0

    def set_audio_states(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        self.audio_states[layer_idx] = (keys, values, mask)

    def get_audio_states(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return self.audio_states.get(layer_idx)

    def _map_audio_states(self, fn) -> None:
        self.audio_states = {idx: tuple(fn(t) for t in states) for idx, states in self.audio_states.items()}

    def reset(self) -> None:
        super().reset()
        self.audio_states = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_audio_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_audio_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_audio_states(lambda t: t[indices, ...])


class AudioFlamingo2WindowAttention(ClapAudioSelfAttention):
    """
    The HTSAT tower's windowed self-attention (transformers' `ClapAudioSelfAttention`, same parameters) computed
    with `scaled_dot_product_attention`, so fused CPU/CUDA kernels apply; the relative position bias and the
    shifted-window mask enter as SDPA's additive mask. Falls back to the parent's matmul path for `eager` or when
    attention weights are requested.
    """

    def __init__(self, config: ClapAudioConfig, dim: int, num_heads: int, window_size):
        super().__init__(config, dim, num_heads, window_size)
        self.config = config
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        if output_attentions or self.config._attn_implementation == "eager":
            return super().forward(hidden_states, attention_mask, output_attentions)
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # Inputs and mask stay 4-D, (windows, heads, N, d) and (1 or windows, heads, N, N): PyTorch's fused CPU
        # kernel takes only those; a 3-D bias or 5-D inputs fall back to the unfused path, which on CPU took
        # 2-2.5x as long for these shapes (64 tokens per window; torch 2.13, 1 thread).
        bias = bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0).to(query.dtype)  # (1, heads, N, N)
        if attention_mask is not None:
            # Windows are laid out batch-major (image by image): the per-window shift mask repeats per image.
            num_windows = attention_mask.shape[0]
            bias = bias + attention_mask.unsqueeze(1).to(query.dtype)  # (num_windows, heads, N, N)
            if batch != num_windows:
                bias = bias.repeat(batch // num_windows, 1, 1, 1)
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=self.dropout_prob if self.training else 0.0
        )
        return (output.transpose(1, 2).reshape(batch, tokens, self.all_head_size),)


class AudioFlamingo2AudioTower(ClapAudioEncoder):
    """transformers' `ClapAudioEncoder` (same modules, same weight names) with its window attention computed
    through SDPA; `audio_config._attn_implementation` chooses between SDPA and the parent's eager path."""

    # Read by attention dispatch checks, as on a `PreTrainedModel`: the window attention runs through SDPA.
    _supports_sdpa = True

    def __init__(self, config: ClapAudioConfig):
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, ClapAudioAttention):
                old = module.self
                module.self = AudioFlamingo2WindowAttention(
                    config, old.all_head_size, old.num_attention_heads, old.window_size
                )


class AudioFlamingo2AudioRotaryEmbedding(nn.Module):
    """
    Rotary frequencies of the audio transformer, applied to the first `rotary_dim` dims of each head.

    Plain default RoPE over window-token positions. It takes its two numbers as arguments rather than a config:
    it is not one of transformers' config-driven rotary layers (no `rope_parameters`, no scaling variants).
    """

    def __init__(self, rotary_dim: int, base: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.base**exponents)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `cos`, `sin` of shape `(seq_len, rotary_dim)` in float32."""
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the leading `cos.shape[-1]` dims of `x` (B, heads, N, head_dim); the rest pass through. Computed in
    float32 like the original, then cast back."""
    rotary_dim = cos.shape[-1]
    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated_fp32 = rotated.float()
    rotated_fp32 = rotated_fp32 * cos + _rotate_half(rotated_fp32) * sin
    return torch.cat((rotated_fp32.to(x.dtype), passthrough), dim=-1)


def eager_masked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with a boolean key mask (True = attend); returns (B, L, heads, head_dim) and the weights."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def audio_attention(module, config, query, key, value, key_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Non-causal attention of `query` over all `key`s allowed by `key_mask` (B, 1, 1, N) through the attention
    backend chosen in `config` (eager, sdpa, ...). Returns (B, L, heads * head_dim) and the attention weights
    (B, heads, L, N) where the backend gives them (eager)."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_masked_attention)
    output, weights = interface(module, query, key, value, key_mask, scaling=query.shape[-1] ** -0.5, dropout=0.0)
    return output.reshape(*output.shape[:2], -1), weights


class AudioFlamingo2AudioSelfAttention(nn.Module):
    is_causal = False
    num_key_value_groups = 1

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        self.config = config
        dim = config.audio_hidden_size
        self.num_heads = config.audio_transformer_num_heads
        self.head_dim = dim // self.num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, N, D); attention_mask (B, 1, 1, N) bool, True where a key may be attended to.
        Returns the output (B, N, D) and the attention weights (eager backend only, else None)."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = rotary
        query = apply_partial_rotary(query, cos, sin)
        key = apply_partial_rotary(key, cos, sin)
        output, weights = audio_attention(self, self.config, query, key, value, attention_mask)
        return self.o_proj(output), weights


class AudioFlamingo2AudioTransformerLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer: attention + residual -> LayerNorm, ReLU FFN + residual -> LayerNorm."""

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        dim = config.audio_hidden_size
        eps = config.audio_transformer_layer_norm_eps
        self.self_attn = AudioFlamingo2AudioSelfAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, config.audio_transformer_intermediate_size)
        self.fc2 = nn.Linear(config.audio_transformer_intermediate_size, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, hidden_states, attention_mask, rotary) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the layer's output (B, N, D) and its attention weights (eager backend only, else None)."""
        attention, weights = self.self_attn(hidden_states, attention_mask, rotary)
        hidden_states = self.self_attn_layer_norm(hidden_states + attention)
        feed_forward = self.fc2(F.relu(self.fc1(hidden_states)))
        return self.final_layer_norm(hidden_states + feed_forward), weights


class AudioFlamingo2AudioTransformer(nn.Module):
    """
    Self-attention over all window tokens of a sample, so that windows see each other before the LM reads them.
    Input scaled by sqrt(D) and LayerNorm-ed; no positional table, positions enter through partial rotary.
    """

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        dim = config.audio_hidden_size
        self.embed_scale = dim**0.5
        self.layer_norm = nn.LayerNorm(dim, eps=config.audio_transformer_layer_norm_eps)
        self.rotary_emb = AudioFlamingo2AudioRotaryEmbedding(
            config.audio_transformer_rotary_dim, config.audio_transformer_rope_theta
        )
        self.layers = nn.ModuleList(
            [AudioFlamingo2AudioTransformerLayer(config) for _ in range(config.audio_transformer_num_layers)]
        )

    def forward(
        self,
        audio_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """audio_embeds (B, N, D); attention_mask (B, N) bool. `last_hidden_state` is (B, N, D); `hidden_states`
        (the normalised input, then each layer's output) and `attentions` (eager backend) when requested."""
        hidden_states = self.layer_norm(audio_embeds * self.embed_scale)
        rotary = self.rotary_emb(hidden_states.shape[1], hidden_states.device)
        key_mask = attention_mask[:, None, None, :]
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, key_mask, rotary)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class AudioFlamingo2GatedCrossAttention(nn.Module):
    """
    Flamingo's gated cross-attention block: text positions attend to all audio tokens of their sample, then a
    feed-forward; each branch enters the residual stream through `tanh(gate)`, gates initialised to zero so an
    untrained block leaves the language model unchanged.
    """

    is_causal = False
    num_key_value_groups = 1

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__()
        dim = config.text_config.hidden_size
        self.text_config = config.text_config
        self.num_heads = config.cross_attention_num_heads
        self.head_dim = config.cross_attention_head_dim
        inner_dim = self.num_heads * self.head_dim
        eps = config.cross_attention_layer_norm_eps
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, inner_dim, bias=False)
        self.kv_proj = nn.Linear(config.audio_hidden_size, 2 * inner_dim, bias=False)
        self.o_proj = nn.Linear(inner_dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_norm = nn.LayerNorm(dim, eps=eps)
        self.ff_up = nn.Linear(dim, dim * config.cross_attention_ff_mult, bias=False)
        self.ff_down = nn.Linear(dim * config.cross_attention_ff_mult, dim, bias=False)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def project_audio(
        self, audio_embeds: torch.Tensor, audio_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """audio_embeds (B, N, D_audio), audio_mask (B, N) bool -> keys, values, each (B, heads, N, head_dim).

        Only the tokens of real windows are projected: in a batch of unequal audio lengths most of the padded
        tensor can be padding, and this projection runs in every layer. Padded positions get zero keys/values
        (the attention mask excludes them)."""
        batch, length, _ = audio_embeds.shape
        if audio_mask is None:
            projected = self.kv_proj(audio_embeds)
        elif torch.compiler.is_compiling():
            # Traced graphs (torch.export, torch.compile) cannot branch on the mask's values nor select a
            # data-dependent number of rows: project every token and zero the padded ones.
            projected = self.kv_proj(audio_embeds) * audio_mask[..., None].to(audio_embeds.dtype)
        elif bool(audio_mask.all()):
            projected = self.kv_proj(audio_embeds)
        else:
            valid = self.kv_proj(audio_embeds[audio_mask])
            projected = valid.new_zeros(batch, length, valid.shape[-1]).index_put((audio_mask,), valid)
        keys, values = projected.chunk(2, dim=-1)
        shape = (batch, length, self.num_heads, self.head_dim)
        # Contiguous copies: these are read at every decoding step, and attention kernels given the strided views
        # copy them at each call (eager attention over 768 audio tokens: 5.9 ms instead of 0.45 ms per layer).
        return keys.reshape(shape).transpose(1, 2).contiguous(), values.reshape(shape).transpose(1, 2).contiguous()

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_keys: torch.Tensor,
        audio_values: torch.Tensor,
        audio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """hidden_states (B, L, dim); audio_keys/values (B, heads, N, head_dim); audio_mask (B, N) bool."""
        batch, length, _ = hidden_states.shape
        query = self.q_proj(self.norm(hidden_states))
        query = query.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key_mask = audio_mask[:, None, None, :]
        attn, _ = audio_attention(self, self.text_config, query, audio_keys, audio_values, key_mask)
        attn = self.o_proj(attn)
        hidden_states = hidden_states + self.attn_gate.tanh() * attn
        feed_forward = self.ff_down(F.gelu(self.ff_up(self.ff_norm(hidden_states))))
        return hidden_states + self.ff_gate.tanh() * feed_forward


class AudioFlamingo2DecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 decoder layer preceded, where the config says so, by a gated cross-attention block over the audio."""

    def __init__(self, config: AudioFlamingo2Config, layer_idx: int):
        super().__init__(config.text_config, layer_idx)
        self.layer_idx = layer_idx
        has_cross_attention = layer_idx in config.cross_attention_layers
        self.cross_attn = AudioFlamingo2GatedCrossAttention(config) if has_cross_attention else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_embeds: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        audio_embeds (B, N, D_audio) and audio_attention_mask (B, N) are given on the forward that brings the audio;
        their keys/values are then stored in the self-attention cache (an `AudioFlamingo2Cache`, which the language
        model passes under its own keyword, `compat.CACHE_KWARG`) and read back on later decoding steps, which pass
        no audio. Every other argument goes to the Qwen2 layer unchanged.
        """
        if self.cross_attn is not None:
            cache = kwargs.get(CACHE_KWARG)
            audio_states = None
            if audio_embeds is not None:
                keys, values = self.cross_attn.project_audio(audio_embeds, audio_attention_mask)
                audio_states = (keys, values, audio_attention_mask)
                if isinstance(cache, AudioFlamingo2Cache):
                    cache.set_audio_states(self.layer_idx, *audio_states)
            elif isinstance(cache, AudioFlamingo2Cache):
                audio_states = cache.get_audio_states(self.layer_idx)
            if audio_states is not None:
                hidden_states = self.cross_attn(hidden_states, *audio_states)
        return super().forward(hidden_states, **kwargs)


class AudioFlamingo2PreTrainedModel(PreTrainedModel):
    config: AudioFlamingo2Config
    config_class = AudioFlamingo2Config
    base_model_prefix = "model"
    input_modalities = ("audio", "text")
    # Decoder, audio transformer and HTSAT stage layers are `GradientCheckpointingLayer`s.
    supports_gradient_checkpointing = True
    # Residual blocks that must stay on one device when `device_map` spreads the model.
    _no_split_modules = ["AudioFlamingo2DecoderLayer", "ClapAudioStage", "AudioFlamingo2AudioTransformerLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    # Every attention (Qwen2's, the audio transformer's, the cross-attention, the tower's windows) takes SDPA.
    _supports_sdpa = True
    # The audio transformer and the cross-attention mask padded audio tokens with a boolean key mask, which the
    # flash-attention kernels (varlen over the query's own sequence) do not take.
    _supports_flash_attn = False
    # The language model's, the audio transformer's and the cross-attention go through `ALL_ATTENTION_FUNCTIONS`, so
    # registered backends apply there (the tower's window attention is SDPA or eager).
    _supports_attention_backend = True
    # `generate` compiles the forward by itself only with a static cache, which cannot hold the audio keys/values
    # (see `_prepare_cache_for_generation`); `torch.compile(model)` and `torch.export` work (tested).
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_audioflamingo2_module(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # No hub kernels unless asked for: see `transformers_af2.compat.LOADING_DEFAULTS`.
        kwargs = {**LOADING_DEFAULTS, **kwargs}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # torchao int8 weight-only layers (quantized now or saved so): PyTorch's int8 kernel for CPU decoding steps.
        use_int8_cpu_kernel(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded


def init_audioflamingo2_module(module: nn.Module) -> None:
    """
    Initialises what `PreTrainedModel._init_weights` does not know: the gates, the audio rotary frequencies and the
    HTSAT tower's relative-position tables. Through transformers' `initialization` helpers, so a model built on the
    meta device, or a checkpoint that lacks some of these, ends with real values rather than empty memory.
    """
    if isinstance(module, AudioFlamingo2GatedCrossAttention):
        # Zero gates: a freshly initialised block leaves the language model's output unchanged.
        init.zeros_(module.attn_gate)
        init.zeros_(module.ff_gate)
    elif isinstance(module, AudioFlamingo2AudioRotaryEmbedding):
        init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
    elif isinstance(module, ClapAudioSelfAttention):
        # As transformers' CLAP initialises them.
        init.zeros_(module.relative_position_bias_table)
        init.copy_(module.relative_position_index, module.create_relative_position_index())


class AudioFlamingo2TextModel(Qwen2Model):
    """Qwen2Model whose decoder layers carry AF2's gated cross-attention; its forward is Qwen2Model's own, which
    passes `audio_embeds` / `audio_attention_mask` keyword arguments through to every layer."""

    @torch.no_grad()
    def _init_weights(self, module):
        # A sub-model initialises its own modules, the cross-attention blocks included.
        super()._init_weights(module)
        init_audioflamingo2_module(module)

    def __init__(self, config: AudioFlamingo2Config):
        text_config = config.text_config
        Qwen2PreTrainedModel.__init__(self, text_config)
        self.padding_idx = text_config.pad_token_id
        self.vocab_size = text_config.vocab_size
        self.embed_tokens = nn.Embedding(text_config.vocab_size, text_config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AudioFlamingo2DecoderLayer(config, layer_idx) for layer_idx in range(text_config.num_hidden_layers)]
        )
        self.norm = Qwen2RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=text_config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in text_config.layer_types
        self.post_init()


@dataclass
class AudioFlamingo2ModelOutputWithPast(BaseModelOutputWithPast):
    """`audio_embeds` (B, N, D_audio): the audio transformer's output, when audio was given."""

    audio_embeds: torch.Tensor | None = None


@dataclass
class AudioFlamingo2CausalLMOutputWithPast(CausalLMOutputWithPast):
    """`audio_embeds` (B, N, D_audio): the audio transformer's output, when audio was given."""

    audio_embeds: torch.Tensor | None = None


@dataclass
class AudioFlamingo2AudioOutput(BaseModelOutputWithPooling):
    """
    What `get_audio_features` returns. `last_hidden_state` (B, windows * tokens_per_window, D_audio): the audio
    tokens the language model attends to (zeros for padded windows); `audio_attention_mask` (B, windows *
    tokens_per_window) bool, True for tokens of real windows; `hidden_states` / `attentions`: the audio
    transformer's, when requested. `pooler_output` is unused: AF2 attends to every audio token.
    """

    audio_attention_mask: torch.Tensor | None = None


class AudioFlamingo2Model(AudioFlamingo2PreTrainedModel):
    def __init__(self, config: AudioFlamingo2Config):
        super().__init__(config)
        # transformers resolves the attention backend of a sub-config when it builds that sub-config's
        # `PreTrainedModel`; the tower is transformers' `ClapAudioEncoder`, a plain module, so its sub-config gets
        # the backend resolved for the whole model, unless one was asked for it (`attn_implementation={...}`).
        if config.audio_config._attn_implementation is None:
            config.audio_config._attn_implementation = config._attn_implementation
        self.audio_tower = AudioFlamingo2AudioTower(config.audio_config)
        self.audio_transformer = AudioFlamingo2AudioTransformer(config)
        self.language_model = AudioFlamingo2TextModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def _check_audio_inputs(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None):
        audio_config: ClapAudioConfig = self.config.audio_config
        tower_device = self.audio_tower.norm.weight.device
        # Another GPU is fine (device_map may spread the model); another kind of device is a user error.
        if input_features.device.type != tower_device.type:
            raise ValueError(
                f"input_features is on {input_features.device.type} but the model is on {tower_device.type}: move "
                "the processor's output with `.to(model.device)`."
            )
        if input_features.ndim != 4 or input_features.shape[-1] != audio_config.num_mel_bins:
            raise ValueError(
                "input_features must have shape (batch, windows, frames, "
                f"{audio_config.num_mel_bins}) as the AudioFlamingo2 processor returns it; got "
                f"{tuple(input_features.shape)}."
            )
        if input_features_mask is not None:
            if input_features_mask.shape != input_features.shape[:2]:
                raise ValueError(
                    f"input_features_mask must have shape (batch, windows) = {tuple(input_features.shape[:2])}; got "
                    f"{tuple(input_features_mask.shape)}."
                )
            # Reading the mask's values is a data-dependent branch that traced graphs cannot hold.
            if torch.compiler.is_compiling():
                return
            empty = (~input_features_mask.bool()).all(dim=1).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"input_features_mask marks no window as valid for batch index(es) {empty}: every sample needs "
                    "at least one audio window."
                )

    @can_return_tuple
    def get_audio_features(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        windows_per_tower_call: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> AudioFlamingo2AudioOutput:
        """
        Encodes audio windows into the tokens the language model attends to.

        Args:
            input_features: `(batch, windows, frames, mels)` log-mel windows from the feature extractor.
            input_features_mask: `(batch, windows)`, 1 for a real window, 0 for batch padding (never encoded).
            windows_per_tower_call: how many windows the HTSAT tower encodes at once. Default: 1 on CPU, all on
                accelerators. Results do not depend on it (each window is encoded independently); on CPU one
                window at a time is both the fastest (the activations of one window stay in cache) and keeps the
                peak memory of a 120 s input ~0.8 GB lower than encoding all 12 windows together.
            output_hidden_states, output_attentions: return the audio transformer's hidden states / attention
                weights (the latter with the eager backend); default from the config.
            return_dict: `False` gives the output's fields as a tuple; default from the config.

        Returns:
            [`AudioFlamingo2AudioOutput`]: `last_hidden_state` `(batch, windows * tokens_per_window, D)`, the audio
            embeddings (tokens of padded windows are zeros), and `audio_attention_mask` `(batch, windows *
            tokens_per_window)` (bool).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        self._check_audio_inputs(input_features, input_features_mask)
        batch, windows = input_features.shape[:2]
        if input_features_mask is None:
            window_mask = torch.ones(batch, windows, dtype=torch.bool, device=input_features.device)
        else:
            window_mask = input_features_mask.to(device=input_features.device, dtype=torch.bool)
        tower_dtype = self.audio_tower.norm.weight.dtype
        tower_device = self.audio_tower.norm.weight.device
        tracing = torch.compiler.is_compiling()
        # Only the real windows are encoded, (n_valid, frames, mels). A traced graph cannot select a data-dependent
        # number of windows: it encodes all of them, padding included (each window is encoded on its own, so the
        # real windows' tokens are the same).
        encoded_windows = input_features.flatten(0, 1) if tracing else input_features[window_mask]
        encoded_windows = encoded_windows.to(device=tower_device, dtype=tower_dtype)
        if windows_per_tower_call is None:
            windows_per_tower_call = 1 if tower_device.type == "cpu" else encoded_windows.shape[0]
        if windows_per_tower_call < 1:
            raise ValueError(f"windows_per_tower_call must be >= 1; got {windows_per_tower_call}.")
        # The tower expects (n, channels, frames, mels); AF2 uses the single-channel ("not longer") path.
        tower_out = torch.cat(
            [
                self.audio_tower(chunk.unsqueeze(1)).last_hidden_state  # (n, D, F', T')
                for chunk in encoded_windows.split(windows_per_tower_call)
            ]
        )
        window_tokens = tower_out.flatten(2).transpose(1, 2)  # (n, tokens_per_window, D)
        tokens_per_window, dim = window_tokens.shape[1:]
        window_mask = window_mask.to(window_tokens.device)
        if tracing:
            all_windows = window_tokens.view(batch, windows, tokens_per_window, dim)
            all_windows = all_windows * window_mask[:, :, None, None].to(all_windows.dtype)
        else:
            all_windows = window_tokens.new_zeros(batch, windows, tokens_per_window, dim)
            all_windows[window_mask] = window_tokens
        token_mask = window_mask.repeat_interleave(tokens_per_window, dim=1)
        encoded = self._encode_window_tokens(
            all_windows, window_mask, token_mask, output_hidden_states, output_attentions
        )
        return AudioFlamingo2AudioOutput(
            last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            audio_attention_mask=token_mask,
        )

    def _encode_window_tokens(
        self,
        all_windows: torch.Tensor,
        window_mask: torch.Tensor,
        token_mask: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """
        Runs the audio transformer over each sample's windows up to its last real one; samples of equal length
        share a call. Trailing batch padding is never computed (in a batch of 10 s and 120 s clips it is most of
        the tensor); the real tokens' results are the same as over the padded batch, since padded keys are masked
        and rotary positions count from each sample's first window. Positions past a sample's length stay zero.

        Hidden states or attention weights, when requested, come from one call over the whole padded batch, so
        that they have one shape; so does a traced graph (torch.export, torch.compile), which cannot group
        samples by their lengths, with the positions past each sample's length set to zero afterwards.
        """
        batch, windows, tokens_per_window, dim = all_windows.shape
        positions = torch.arange(1, windows + 1, device=window_mask.device)
        lengths = (window_mask * positions).amax(dim=1)  # windows up to the last real one, per sample
        if output_hidden_states or output_attentions or torch.compiler.is_compiling():
            encoded = self.audio_transformer(
                all_windows.reshape(batch, windows * tokens_per_window, dim),
                token_mask,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
            within_length = (positions[None, :] <= lengths[:, None]).repeat_interleave(tokens_per_window, dim=1)
            encoded.last_hidden_state = encoded.last_hidden_state * within_length[..., None].to(all_windows.dtype)
            return encoded
        lengths = lengths.tolist()
        if all(length == windows for length in lengths):
            return self.audio_transformer(all_windows.reshape(batch, windows * tokens_per_window, dim), token_mask)
        audio_embeds = all_windows.new_zeros(batch, windows * tokens_per_window, dim)
        for length in sorted(set(lengths)):
            rows = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=all_windows.device)
            tokens = length * tokens_per_window
            encoded = self.audio_transformer(
                all_windows[rows, :length].reshape(len(rows), tokens, dim), token_mask[rows, :tokens]
            ).last_hidden_state
            audio_embeds[rows, :tokens] = encoded
        return BaseModelOutput(last_hidden_state=audio_embeds)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> AudioFlamingo2ModelOutputWithPast:
        """
        The self-attention cache comes and goes under the name the installed transformers gives it (`past_key_values`
        before 5.24, `cache` since; see `compat.CACHE_KWARG`).
        """
        cache = pop_cache(kwargs)
        audio_embeds = audio_attention_mask = None
        if input_features is not None:
            audio = self.get_audio_features(input_features, input_features_mask, return_dict=True)
            audio_embeds, audio_attention_mask = audio.last_hidden_state, audio.audio_attention_mask
            batch = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
            if audio_embeds.shape[0] != batch:
                raise ValueError(
                    f"input_features has {audio_embeds.shape[0]} samples but the text has {batch}: pass one audio "
                    "(with its windows) per text row."
                )
            if cache is not None and not isinstance(cache, AudioFlamingo2Cache):
                raise ValueError(
                    f"{CACHE_KWARG} is a {type(cache).__name__}, which cannot hold the audio keys/values; "
                    "pass an AudioFlamingo2Cache (or none, and one is created)."
                )
        if use_cache is None:
            use_cache = self.config.text_config.use_cache
        if use_cache and cache is None:
            cache = AudioFlamingo2Cache(config=self.config.text_config)

        outputs = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            audio_embeds=audio_embeds,
            audio_attention_mask=audio_attention_mask,
            return_dict=True,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        return AudioFlamingo2ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_embeds=audio_embeds,
            **{CACHE_KWARG: outputs.get(CACHE_KWARG)},
        )


def _copy_integer_buffers(model: nn.Module) -> None:
    """
    Buffers loaded in the checkpoint's own dtype (the tower's relative-position indices, BatchNorm's counter) are
    views of the memory-mapped safetensors file. When the weights are cast while loading (a float32 checkpoint
    loaded in bfloat16), those few views alone would keep the whole float32 file mapped, and its pages resident,
    for the model's lifetime: three times the memory of the bfloat16 weights. Copying them (kilobytes) lets the
    mapping go.
    """
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_floating_point():
                module._buffers[name] = buffer.clone()


def _check_finite_weights(model: nn.Module, source) -> None:
    """
    A checkpoint with NaN or inf weights answers garbage (greedy decoding repeats token 0) without any error: refuse
    it at load, naming the tensors.
    """
    bad = non_finite_tensors(model.state_dict().items())
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} weight tensor(s) hold NaN or inf values: {bad[:10]}"
            f"{' ...' if len(bad) > 10 else ''}. The checkpoint is corrupt or was saved after a diverged training run."
        )


class AudioFlamingo2ForConditionalGeneration(AudioFlamingo2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # As Qwen2ForCausalLM's: the head is sharded by vocabulary and the logits gathered. The released checkpoints tie
    # it to the embedding, which the text config's plan shards too, so it needs its own entry.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: AudioFlamingo2Config):
        super().__init__(config)
        self.model = AudioFlamingo2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_audio_features(self, input_features, input_features_mask=None, **kwargs) -> AudioFlamingo2AudioOutput:
        """See [`AudioFlamingo2Model.get_audio_features`]."""
        return self.model.get_audio_features(input_features, input_features_mask, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> AudioFlamingo2CausalLMOutputWithPast:
        r"""
        Args:
            input_ids: `(batch, seq)` token ids; the prompt starts with `<audio>`.
            input_features: `(batch, windows, frames, mels)` log-mel windows; needed on the first forward of a
                sequence, after which the audio lives in the cache.
            input_features_mask: `(batch, windows)`, 0 for windows that only pad the batch.
            labels: `(batch, seq)`, -100 where no loss is taken; shifted inside like any causal LM.
            cache (or `past_key_values` before transformers 5.24, see `compat.CACHE_KWARG`): the self-attention
                cache; an `AudioFlamingo2Cache` also keeps the audio keys/values.
        """
        outputs = self.model(
            input_ids=input_ids,
            input_features=input_features,
            input_features_mask=input_features_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return AudioFlamingo2CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_embeds=outputs.audio_embeds,
            **{CACHE_KWARG: outputs.get(CACHE_KWARG)},
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        Loads a transformers repository as usual, then copies the integer buffers out of the memory-mapped file (see
        `_copy_integer_buffers`). Checkpoints in NVIDIA's original layout are converted before they get here, by
        `transformers_af2.hub_ids`.
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
        _copy_integer_buffers(model)
        _check_finite_weights(model, pretrained_model_name_or_path)
        return loaded

    def _prepare_generation_config(self, generation_config=None, **kwargs):
        # A user's `max_length` wins over the `max_new_tokens` that converted checkpoints' generation configs pin.
        prepared, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        return honour_max_length(prepared, generation_config, kwargs), model_kwargs

    def _get_logits_processor(self, *args, **kwargs):
        # NaN/inf logits raise naming the batch row, instead of greedy answering token 0 ("!!!!") as if all were fine.
        return with_non_finite_check(super()._get_logits_processor(*args, **kwargs))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        user_cache = model_kwargs.get(CACHE_KWARG)
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_KWARG)
        if user_cache is None and type(cache) is DynamicCache:
            # generate() built a DynamicCache (cache_implementation "dynamic" or "offloaded"); AF2 needs the variant
            # that also carries the audio keys/values, built the same way (offloading included).
            model_kwargs[CACHE_KWARG] = AudioFlamingo2Cache(
                config=self.config.get_text_config(decoder=True),
                offloading=cache.offloading,
                offload_only_non_sliding=getattr(cache, "only_non_sliding", False),
            )
        elif (
            cache is not None
            and not isinstance(cache, AudioFlamingo2Cache)
            and model_kwargs.get("input_features") is not None
        ):
            kind = (
                f"the {type(cache).__name__} passed as `{CACHE_KWARG}`"
                if user_cache is not None
                else f"cache_implementation={generation_config.cache_implementation!r} (a {type(cache).__name__})"
            )
            raise ValueError(
                f"AudioFlamingo2 keeps the audio keys/values in an AudioFlamingo2Cache, and {kind} cannot hold them. "
                "Generate with cache_implementation='dynamic' (the default) or 'offloaded', or pass an "
                f"AudioFlamingo2Cache as `{CACHE_KWARG}`."
            )


__all__ = [
    "AudioFlamingo2AudioOutput",
    "AudioFlamingo2Cache",
    "AudioFlamingo2ForConditionalGeneration",
    "AudioFlamingo2Model",
    "AudioFlamingo2PreTrainedModel",
]
