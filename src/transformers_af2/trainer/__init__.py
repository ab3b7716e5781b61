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

from .collator import AudioFlamingo2DataCollator, af2_labels, build_training_text
from .data import (
    DataCheck,
    check_training_data,
    count_windows,
    from_hf_dataset,
    length_key,
    load_af2_json,
    load_jsonl,
    load_training_data,
)
from .lora import LORA_TARGETS, apply_lora, continue_lora, load_lora, lora_config, lora_target_regex, merge_lora
from .stages import (
    STAGES,
    TrainableSummary,
    eval_frozen_modules,
    frozen_eval_module_names,
    mask_embedding_gradient,
    set_trainable_parameters,
)
from .training import AudioFlamingo2Trainer, last_complete_checkpoint

__all__ = [
    "LORA_TARGETS",
    "STAGES",
    "AudioFlamingo2DataCollator",
    "AudioFlamingo2Trainer",
    "DataCheck",
    "TrainableSummary",
    "af2_labels",
    "apply_lora",
    "build_training_text",
    "check_training_data",
    "continue_lora",
    "count_windows",
    "eval_frozen_modules",
    "frozen_eval_module_names",
    "from_hf_dataset",
    "last_complete_checkpoint",
    "length_key",
    "load_af2_json",
    "load_jsonl",
    "load_lora",
    "load_training_data",
    "lora_config",
    "lora_target_regex",
    "mask_embedding_gradient",
    "merge_lora",
    "set_trainable_parameters",
]
