"""Benchmark evaluation of AF2 as the original does it: the task table, readers, scorers and runner that `af2 eval`
runs."""

from ..utils import lazy_exports

# name -> the module defining it, imported on first use: `af2 eval --help` reads the task table without importing
# the engines and the runner.
_HOMES = {
    "CaptionEngine": ".engines",
    "LoopEngine": ".engines",
    "AnswerGenerator": ".generation",
    "BatchedAnswerGenerator": ".generation",
    "run_evaluation": ".runner",
    "match_label": ".scoring",
    "mmau_string_match": ".scoring",
    "normalize_answer": ".scoring",
    "score_items": ".scoring",
    "short_answer_match": ".scoring",
    "GENERATION_SETTINGS": ".tasks",
    "TASKS": ".tasks",
    "EvalTask": ".tasks",
    "get_task": ".tasks",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
