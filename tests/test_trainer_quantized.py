"""bitsandbytes on CPU: `load_in_8bit` quantizes every linear but the head, and QLoRA (PEFT adapters on the 8-bit
or 4-bit model) trains through the Trainer, moving the adapters only.

4-bit on CPU packs weights in blocks (bitsandbytes asserts `out_features % 32 == 0`), so the 4-bit model is built
with every linear a multiple of 64 wide; the head (vocabulary 99) is never quantized.
"""

import logging

import pytest
import torch
from conftest import BLOCK_ALIGNED, random_audio_inputs, tiny_model
from transformers import BitsAndBytesConfig, TrainingArguments

from transformers_af2 import AudioFlamingo2ForConditionalGeneration
from transformers_af2.trainer import (
    AudioFlamingo2Trainer,
    apply_lora,
    eval_frozen_modules,
    frozen_eval_module_names,
)

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is a training extra: pip install transformers-af2[train]"
)

QUANTIZATIONS = {
    "8bit": (BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt"),
    "4bit": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), "Linear4bit"),
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    tiny_model().save_pretrained(root / "tiny")
    tiny_model(**BLOCK_ALIGNED).save_pretrained(root / "aligned")
    return root


def _batch(seed=0):
    features, mask = random_audio_inputs([1, 2], seed=seed)
    input_ids = torch.tensor([[95, 5, 6, 94, 7, 8, 96, 98], [95, 9, 10, 11, 94, 12, 96, 98]])
    labels = input_ids.masked_fill(torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]).bool(), -100)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "input_features": features,
        "input_features_mask": mask,
    }


def test_load_in_8bit_quantizes_every_linear_but_the_head(saved_models):
    plain = AudioFlamingo2ForConditionalGeneration.from_pretrained(saved_models / "tiny")
    linears = {name for name, module in plain.named_modules() if type(module) is torch.nn.Linear}
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        saved_models / "tiny", quantization_config=QUANTIZATIONS["8bit"][0]
    )
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear8bitLt)}
    left = {name for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    print(f"{len(quantized)} of {len(linears)} linears in 8 bits; left: {sorted(left)}")
    assert quantized == linears - {"lm_head"} and left == {"lm_head"}
    batch = _batch()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        reference = plain.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape == (2, 8, 99) and torch.isfinite(logits).all()
    # int8 weights and fp16 activations: close to the float model, not equal.
    assert 0 < (logits - reference).abs().max().item() < 0.25 * reference.abs().max().item()


def _float16_cast_lines(caplog) -> int:
    return sum("to float16 during quantization" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_qlora_step_through_trainer_moves_only_the_adapters(saved_models, tmp_path, bits, caplog, monkeypatch):
    # This test's Trainer installs bitsandbytes' once-per-message filter afresh (counted below).
    monkeypatch.setattr(logging.getLogger("bitsandbytes.autograd._functions"), "filters", [])
    quantization, layer_class = QUANTIZATIONS[bits]
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        saved_models / "aligned", quantization_config=quantization
    )
    assert sum(type(module).__name__ == layer_class for module in model.modules()) == 65
    model = apply_lora(model, targets="both", r=4)
    inputs = {k: v for k, v in _batch(2).items() if k != "labels"}

    def base_logits():
        # In the modes training uses (the frozen tower in eval mode, the rest in train mode with dropout 0): a 4-bit
        # layer run in eval mode before training would be repacked for bitsandbytes' CPU inference kernels, which
        # cannot train.
        model.train()
        eval_frozen_modules(model, frozen_eval_module_names(model))
        with torch.no_grad(), model.disable_adapter():
            return model(**inputs).logits

    # bitsandbytes repacks a 4-bit weight in place for its CPU kernels whenever the layer runs in eval mode (the
    # frozen tower) and unpacks it when the state dict is read: its storage changes layout without the weight
    # changing. 4-bit weights are therefore compared by what the base computes (the logits), all else exactly.
    repacked = (lambda param: isinstance(param, bnb.nn.Params4bit)) if bits == "4bit" else (lambda param: False)
    before = {name: param.detach().clone() for name, param in model.named_parameters() if not repacked(param)}
    states_before = {name: tensor.clone() for name, tensor in model.state_dict().items()} if bits == "8bit" else {}
    caplog.clear()
    base_before = base_logits()
    casts_without_trainer = _float16_cast_lines(caplog)
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=TrainingArguments(
            str(tmp_path / "out"),
            per_device_train_batch_size=2,
            max_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        ),
        data_collator=lambda rows: rows[0],
        train_dataset=[_batch(0), _batch(1)],
    )
    caplog.clear()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    if bits == "8bit":  # bitsandbytes' notice at every 8-bit matmul: once per run under the Trainer
        assert casts_without_trainer >= 65 and _float16_cast_lines(caplog) == 1, casts_without_trainer
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed and all(".lora_" in name for name in changed), sorted(n for n in changed if ".lora_" not in n)
    assert any(".lora_B." in name for name in changed)
    # The quantized base computes exactly what it did: nothing but the adapters moved.
    assert torch.equal(base_logits(), base_before)
    if bits == "8bit":  # int8 weights and their scales, compared as stored
        states_after = model.state_dict()
        moved = {name for name in states_before if not torch.equal(states_before[name], states_after[name])}
        assert moved == changed
