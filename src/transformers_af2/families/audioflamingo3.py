"""
Audio Flamingo 3 and Music Flamingo (transformers' own `audioflamingo3` and `musicflamingo` models).

Both take the question through the processor's chat template (Qwen2.5 chat format with the checkpoint's system
prompt), hear the clip in 30 s Whisper windows (AF3: 20 at most, 10 min; MF: 40, 20 min: the processor's
`max_audio_len`), put one `<sound>` token per encoder frame in the prompt (MF between `<|sound_bos|>` and
`<|sound_eos|>`), and stop at `<|im_end|>`. "Think" checkpoints answer `<think>reasoning</think>answer`; the answer
is what follows the reasoning.

The per-clip part of the inputs (the clip's windows, their mask, and its audio token ids) is computed once by the
processor itself, on a prompt that is only the audio placeholder; a batch joins the clips' windows (the processor
extracts every window on its own, so this equals its batch output exactly) and tokenises the chat prompts with the
placeholder expanded, left-padded, as the processor does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import logging

from ..generation_utils import through_first_eos
from .base import EncodedAudio, EvalPrompt, ModelFamily, UnreadableAudio, decode_mono

logger = logging.get_logger(__name__)

# The multiple-choice instruction of AF3's model documentation in transformers (docs/source/en/model_doc/
# audioflamingo3.md, "Instruction: ... Choose the correct option among the options below: (A) ... (B) ...."),
# written with NVIDIA's release of the -hf checkpoint. NVIDIA's own AF3 benchmark script (llava/eval/
# eval_audio_bench.py on the audio_flamingo_3 branch) reads its prompts from manifests that were not published.
AF3_MMAU_PROMPT = EvalPrompt(
    template="Instruction: {question} Choose the correct option among the options below: {options_inline}.",
    source="transformers docs/source/en/model_doc/audioflamingo3.md (AF3 multiple-choice instruction)",
)
# The suffix that turns on AF3's reasoning (NVIDIA audio-flamingo, branch audio_flamingo_3, README).
AF3_THINK_SUFFIX = "Please think and reason about the input audio before you respond."

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def split_thinking(text: str) -> tuple[str, str]:
    """
    `(reasoning, answer)` of a decoded answer in any of the "think" forms: `<think>r</think>a`, `r</think>a` (the
    opening tag in the prompt), or `<think>r` with no closing tag (cut by the token limit: no answer yet, "").
    Text without tags is all answer.
    """
    if "</think>" in text:
        head, _, tail = text.rpartition("</think>")
        return head.replace("<think>", "").strip(), tail.strip()
    if "<think>" in text:
        head, _, tail = text.partition("<think>")
        return tail.strip(), head.strip()
    return "", text.strip()


class AudioFlamingo3Family(ModelFamily):
    model_types = ("audioflamingo3",)
    display_name = "Audio Flamingo 3"
    short_name = "AF3"
    eval_prompts = {"mmau": AF3_MMAU_PROMPT}
    # Fine-tuning: LoRA on the Qwen2 language model; the audio encoder and projector stay as released (see
    # trainer/README.md). AF2's stages name AF2's own modules (audio transformer, cross-attention) and do not apply.
    training_stages = ("none",)
    lora_targets = ("language_model",)

    @classmethod
    def model_class(cls):
        from transformers import AudioFlamingo3ForConditionalGeneration

        return AudioFlamingo3ForConditionalGeneration

    @classmethod
    def load(cls, model_id: str, dtype=None, original_config: str | None = None, **from_pretrained_options):
        from transformers import AutoProcessor

        if original_config is not None:
            raise ValueError(f"--config is for original-layout AF2 checkpoints; {model_id} is {cls.display_name}.")
        model = cls.model_class().from_pretrained(model_id, dtype=dtype, **from_pretrained_options)
        return model.eval(), AutoProcessor.from_pretrained(model_id)

    # -- what the model hears --------------------------------------------------------------------------------------
    @property
    def window_seconds(self) -> float:
        return float(self.processor.feature_extractor.chunk_length)

    @property
    def max_windows(self) -> int:
        return int(self.processor.max_audio_len // self.processor.feature_extractor.chunk_length)

    # -- inputs ----------------------------------------------------------------------------------------------------
    def chat_prompt(self, question: str) -> str:
        """The processor's chat template for one user turn: the audio, then the question."""
        conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def check_questions(self, questions: Sequence[str]) -> None:
        token = self.processor.audio_token
        for question in questions:
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"question {question!r} is empty; ask something about the clip.")
            count = self.chat_prompt(question).count(token)
            if count != 1:
                raise ValueError(
                    f"prompt {question!r} renders with {count} {token} tokens; {self.display_name} takes exactly one "
                    f"audio per prompt (leave {token} out of the question: the chat template places the audio)."
                )

    def encode_audio(self, audio, sampling_rate: int | None = None) -> EncodedAudio:
        rate = self.sampling_rate
        waveform, seconds = decode_mono(audio, sampling_rate, rate, self.max_seconds)
        encoded = self.processor(text=[self.processor.audio_token], audio=[waveform], return_tensors="pt")
        audio_ids = encoded["input_ids"][0][encoded["attention_mask"][0].bool()].tolist()
        windows = int(encoded["input_features"].shape[0])
        return EncodedAudio(
            features={
                "input_features": encoded["input_features"],
                "input_features_mask": encoded["input_features_mask"],
                "audio_token_ids": audio_ids,
            },
            windows=windows,
            seconds=seconds,
            seconds_dropped=round(max(0.0, seconds - self.max_seconds), 3),
        )

    def batch_inputs(self, questions: Sequence[str], clips: Sequence[EncodedAudio]) -> BatchFeature:
        """`input_ids`, `attention_mask` (batch, seq, left-padded), `input_features` (all windows of the batch,
        mels, frames) and `input_features_mask` (windows, frames), as `processor(text=chat prompts, audio=...)`."""
        tokenizer = self.processor.tokenizer
        token = self.processor.audio_token
        texts = []
        for question, clip in zip(questions, clips, strict=True):
            expansion = "".join(tokenizer.convert_ids_to_tokens(clip.features["audio_token_ids"]))
            texts.append(self.chat_prompt(question).replace(token, expansion, 1))
        batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        return BatchFeature(
            data={
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "input_features": torch.cat([clip.features["input_features"] for clip in clips]),
                "input_features_mask": torch.cat([clip.features["input_features_mask"] for clip in clips]),
            }
        )

    # -- training ----------------------------------------------------------------------------------------------------
    # The token that ends the assistant's turn in the chat template (and that generation stops at).
    end_of_turn = "<|im_end|>"

    def training_waveform(self, audio, audio_start: float = 0.0, sampling_rate: int | None = None) -> np.ndarray:
        """The clip as the processor takes it (mono, at its rate), from `audio_start` seconds on; raises
        `UnreadableAudio` when it cannot be read."""
        rate, start = self.sampling_rate, float(audio_start or 0.0)
        try:
            waveform, seconds = decode_mono(audio, sampling_rate, rate, self.max_seconds + start)
        except Exception as error:  # whatever fails to decode here would fail the run at that step
            raise UnreadableAudio(" ".join(str(error).split()).rstrip(".") or type(error).__name__) from error
        first = int(round(start * rate))
        if first >= len(waveform):
            raise UnreadableAudio(f"audio_start {start} s is at or past the end of the clip ({seconds:.3f} s)")
        return waveform[first:]

    def training_row(self, prompt: str, answer: str, waveform: np.ndarray) -> tuple[dict, int]:
        """
        One example through the processor: the chat template's user turn (audio, then `prompt`) and the assistant's
        `answer` closed by `<|im_end|>`, with `output_labels=True`. transformers' rule masks the audio tokens and the
        padding only, so the system prompt and the question would be trained on too; here every token before the
        answer is -100 as well. Returns `(inputs of one row, index of the first answer token)`.
        """
        text = self.chat_prompt(prompt) + answer + self.end_of_turn
        encoded = self.processor(text=[text], audio=[waveform], output_labels=True, return_tensors="pt")
        ids, labels = encoded["input_ids"][0], encoded["labels"][0].clone()
        answer_ids = self.processor.tokenizer(answer + self.end_of_turn, add_special_tokens=False)["input_ids"]
        first = len(ids) - len(answer_ids)
        if ids[first:].tolist() != answer_ids:
            raise ValueError(
                f"answer {answer!r}: its tokens merge with the prompt's end in the chat template, so the answer's "
                "labels cannot be told apart; strip the answer's leading whitespace."
            )
        labels[:first] = -100
        features = {key: encoded[key] for key in ("input_features", "input_features_mask")}
        return {"input_ids": ids, "labels": labels, **features}, first

    def training_inputs(
        self, prompts, answers, audios, audio_starts=None, max_length=512, sampling_rate=None, pad_to_multiple_of=None
    ) -> dict:
        """`input_ids`, `attention_mask`, `labels` (batch, tokens; right padded with the pad token) and every window
        of the batch, `input_features` (windows, mels, frames) and `input_features_mask` (windows, frames), as in
        `batch_inputs`. A sample over `max_length` keeps its prompt whole (its audio tokens must match its windows)
        and loses the rest; its answer is not trained on."""
        starts = audio_starts if audio_starts is not None else [0.0] * len(audios)
        rows = []
        for prompt, answer, audio, start in zip(prompts, answers, audios, starts, strict=True):
            row, first = self.training_row(prompt, answer, self.training_waveform(audio, start, sampling_rate))
            if len(row["input_ids"]) > max_length:
                logger.warning_once(
                    f"a training sample is longer than max_length={max_length} tokens; its answer is not trained on. "
                    "Shorten the prompt or the answer, or raise max_length."
                )
                keep = max(max_length, first)
                row["input_ids"], row["labels"] = row["input_ids"][:keep], torch.full((keep,), -100)
            rows.append(row)
        width = max(len(row["input_ids"]) for row in rows)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, :length], labels[index, :length] = row["input_ids"], row["labels"]
            attention_mask[index, :length] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "input_features": torch.cat([row["input_features"] for row in rows]),
            "input_features_mask": torch.cat([row["input_features_mask"] for row in rows]),
        }

    def check_training_example(self, prompt, answer, audio, audio_start=0.0, max_length=512, sampling_rate=None):
        row, first = self.training_row(prompt, answer, self.training_waveform(audio, audio_start, sampling_rate))
        tokens = len(row["input_ids"])
        return tokens, 0 if tokens > max_length else tokens - first

    def to_model(self, batch, model):
        # The audio tower's convolutions take the model's dtype (AF2's model casts itself; these do not).
        batch = batch.to(model.device)
        batch["input_features"] = batch["input_features"].to(model.dtype)
        return batch

    def spectrogram(self, clip: EncodedAudio) -> np.ndarray:
        return clip.features["input_features"].transpose(1, 2).float().numpy()

    # -- answers ---------------------------------------------------------------------------------------------------
    def stop_kwargs(self, model) -> dict:
        config, tokenizer = model.generation_config, self.processor.tokenizer
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        return {"eos_token_id": eos, "pad_token_id": pad}

    def decode_answers(self, new_tokens) -> list[str]:
        """The text of each row up to its first end of turn (`<|im_end|>`, or any special token the checkpoint ends
        on), with a leading `<think>...</think>` reasoning removed (see `split_thinking`)."""
        rows = new_tokens.tolist() if hasattr(new_tokens, "tolist") else [list(row) for row in new_tokens]
        tokenizer = self.processor.tokenizer
        end_of_turn = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None}
        answers = []
        for row in through_first_eos(rows, end_of_turn):
            text = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(split_thinking(text)[1])
        return answers


class MusicFlamingoFamily(AudioFlamingo3Family):
    model_types = ("musicflamingo",)
    display_name = "Music Flamingo"
    short_name = "MF"
    # No MMAU prompt of Music Flamingo's own has been published: the task's prompt is used.
    eval_prompts = {}

    @classmethod
    def model_class(cls):
        from transformers import MusicFlamingoForConditionalGeneration

        return MusicFlamingoForConditionalGeneration
