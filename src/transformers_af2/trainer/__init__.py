"""Fine-tuning utilities for Audio Flamingo 2 with the transformers Trainer.

    from transformers import TrainingArguments
    from transformers_af2.trainer import (AudioFlamingo2DataCollator, AudioFlamingo2Trainer, load_training_data,
                                          set_trainable_parameters)

    trainable = set_trainable_parameters(model, "finetune")      # AF2's stage recipe
    trainer = AudioFlamingo2Trainer(
        model=model,
        trainable=trainable,                                      # only the new embedding rows train
        args=TrainingArguments("out", train_sampling_strategy="group_by_length", bf16=True),
        data_collator=AudioFlamingo2DataCollator(processor),
        train_dataset=load_training_data("train.json", data_root="/data",
                                         feature_extractor=processor.feature_extractor),
    )
    trainer.train()

See `trainer/README.md` for the command line (`af2 train`), LoRA, and multi-GPU / FSDP.
"""

from ..utils import lazy_exports

# name -> the submodule defining it. Imported on first use, so `af2 train`'s parser (trainer.cli, this package's
# submodule) does not import transformers' Trainer, peft, bitsandbytes and datasets before a command needs them.
_HOMES = {
    "AudioFlamingo2DataCollator": ".collator",
    "TrainingDataCollator": ".collator",
    "af2_labels": ".collator",
    "build_training_text": ".collator",
    "DataCheck": ".data",
    "check_training_data": ".data",
    "count_windows": ".data",
    "from_hf_dataset": ".data",
    "length_key": ".data",
    "load_af2_json": ".data",
    "load_jsonl": ".data",
    "load_training_data": ".data",
    "LORA_TARGETS": ".lora",
    "apply_lora": ".lora",
    "continue_lora": ".lora",
    "load_lora": ".lora",
    "lora_config": ".lora",
    "lora_target_regex": ".lora",
    "merge_lora": ".lora",
    "STAGES": ".stages",
    "TrainableSummary": ".stages",
    "eval_frozen_modules": ".stages",
    "frozen_eval_module_names": ".stages",
    "mask_embedding_gradient": ".stages",
    "set_trainable_parameters": ".stages",
    "AudioFlamingo2Trainer": ".training",
    "last_complete_checkpoint": ".training",
}

__all__ = sorted(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
