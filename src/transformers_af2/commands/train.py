"""
`af2 train`: fine-tuning with the transformers Trainer. Its options and its run are `transformers_af2.trainer.cli`
(every `TrainingArguments` field is an option, so building them imports transformers); this module adds them to
`af2`, or a `train` command that says what to install when the [train] extras are missing.
"""

from __future__ import annotations

import importlib

HELP = "fine-tune AF2 with the transformers Trainer (stages, LoRA, any TrainingArguments option)"
TRAINER_COMMAND = "transformers_af2.trainer.cli"


def add_parser(subparsers) -> None:
    try:
        module = importlib.import_module(TRAINER_COMMAND)
    except ModuleNotFoundError as error:
        if error.name in (TRAINER_COMMAND, "transformers_af2.trainer"):
            return  # no trainer command in this installation
        module, missing = None, error
    except ImportError as error:
        module, missing = None, error
    if module is None:  # the module is there but its dependencies are not, e.g. the [train] extras
        message = f"needs the training dependencies ({missing}); install them with: pip install -e '.[train]'"
        parser = subparsers.add_parser("train", help="fine-tune AF2 (unavailable: missing dependencies)")
        parser.set_defaults(handler=lambda args: _fail(message))
        return
    module.add_train_parser(subparsers)


def run(args) -> int:
    """What `af2 train`'s parser runs (`trainer.cli.run_train`)."""
    return importlib.import_module(TRAINER_COMMAND).run_train(args)


def _fail(message: str) -> int:
    raise RuntimeError(message)
