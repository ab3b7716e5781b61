"""
The SoundCoT repair step of the original (inference_HF_pretrained/inference_CoT.py).

AF2-SoundCoT answers `<SUMMARY>…</SUMMARY><REASONING>…</REASONING><CONCLUSION>…</CONCLUSION>`. When an answer opens
its reasoning but never concludes (it ran out of tokens or looped), the original cuts the reasoning, appends
`</REASONING>\\n<CONCLUSION>` to the prompt and generates again. `soundcot_repair_prefix` is that rule on one answer;
`repair_unconcluded_answers` runs the second pass for a batch of answers. The pipeline (`soundcot_repair=True`) and
`af2 generate --soundcot-repair` both go through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOUNDCOT_REPAIR_SUFFIX = "</REASONING>\n<CONCLUSION>"
SOUNDCOT_REPAIR_MAX_CHARS = 512
# The original tokenises the repaired prompt with max_length=1024, truncation on.
SOUNDCOT_REPAIR_MAX_PROMPT_TOKENS = 1024


def soundcot_repair_prefix(answer: str) -> str | None:
    """
    The original SoundCoT repair rule: for an answer (the decoded text after `<SEP>`, not stripped) that opens a
    `<reasoning>` section but has no `</conclusion>`, the text to append to the prompt before generating again;
    `None` when no repair is needed.

    As in the original, the answer is lower-cased; the reasoning is cut at `</reasoning>` when present, else the
    first 512 characters are kept (stripped) and cut at their last `.` (with no `.` at all, the original's
    `rfind` gives -1 and drops the last character; kept here), and `</REASONING>\\n<CONCLUSION>` is appended.
    """
    text = answer.lower()
    if "<reasoning>" not in text or "</conclusion>" in text:
        return None
    if "</reasoning>" in text:
        kept = text.split("</reasoning>")[0]
    else:
        if len(text) >= SOUNDCOT_REPAIR_MAX_CHARS:
            text = text[:SOUNDCOT_REPAIR_MAX_CHARS].strip()
        kept = text[: text.rfind(".")]
    return kept + SOUNDCOT_REPAIR_SUFFIX


def repair_unconcluded_answers(
    processor,
    model_inputs: dict,
    prompt_texts: Sequence[str],
    new_tokens: list[list[int]],
    generate_new_tokens: Callable[[dict], list[list[int]]],
) -> tuple[list[list[int]], list[str | None]]:
    """
    The original's second pass for the answers that reason without concluding.

    Args:
        processor: the `AudioFlamingo2Processor` (decodes answers, tokenises the repaired prompts).
        model_inputs: the first pass's inputs; `input_features` and `input_features_mask` are `(batch, ...)`.
        prompt_texts: the prompt string of each batch row, as the model saw it (ending in `<SEP>`).
        new_tokens: the first pass's new tokens, `len(prompt_texts) * k` sequences (k per row, in row order).
        generate_new_tokens: runs `generate` on a dict of model inputs (one sequence per row) and returns each row's
            new tokens; the caller's generation settings apply to the second pass as to the first.

    Returns:
        `(new_tokens, prefixes)`: the repaired sequences' second-pass tokens in place of the unconcluded ones, and per
        sequence the text appended to its prompt (`None` where nothing was repaired). The repaired answer is
        `prefix + decoded new tokens`, as the original reads it after `<SEP>`.
    """
    per_row = len(new_tokens) // len(prompt_texts)
    prefixes = [
        soundcot_repair_prefix(processor.decode_answers([tokens], skip_special_tokens=False, strip=False)[0])
        for tokens in new_tokens
    ]
    todo = [index for index, prefix in enumerate(prefixes) if prefix is not None]
    if not todo:
        return new_tokens, prefixes
    tokenizer = processor.tokenizer
    prompts = [prompt_texts[index // per_row] + prefixes[index] for index in todo]
    encoded = tokenizer(prompts, truncation=True, max_length=SOUNDCOT_REPAIR_MAX_PROMPT_TOKENS)
    padded = tokenizer.pad(encoded, padding_side="left", return_tensors="pt")
    text_device = model_inputs["input_ids"].device
    rows = torch.tensor([index // per_row for index in todo], device=model_inputs["input_features"].device)
    repair_inputs = {
        "input_ids": padded["input_ids"].to(text_device),
        "attention_mask": padded["attention_mask"].to(text_device),
        "input_features": model_inputs["input_features"][rows],
        "input_features_mask": model_inputs["input_features_mask"][rows],
    }
    logger.info(f"SoundCoT: {len(todo)} answer(s) reasoned without a conclusion; generating again.")
    repaired = generate_new_tokens(repair_inputs)
    new_tokens = list(new_tokens)
    for position, index in enumerate(todo):
        new_tokens[index] = repaired[position]
    return new_tokens, prefixes


__all__ = [
    "SOUNDCOT_REPAIR_MAX_CHARS",
    "SOUNDCOT_REPAIR_MAX_PROMPT_TOKENS",
    "SOUNDCOT_REPAIR_SUFFIX",
    "repair_unconcluded_answers",
    "soundcot_repair_prefix",
]
