"""Benchmark evaluation of AF2 as the original does it: `af2 eval`, the task table, readers, scorers, runner."""

from .engines import CaptionEngine, LoopEngine
from .generation import AnswerGenerator, BatchedAnswerGenerator
from .runner import run_evaluation
from .scoring import match_label, mmau_string_match, normalize_answer, score_items, short_answer_match
from .tasks import GENERATION_SETTINGS, TASKS, EvalTask, get_task

__all__ = [
    "GENERATION_SETTINGS",
    "TASKS",
    "AnswerGenerator",
    "BatchedAnswerGenerator",
    "CaptionEngine",
    "EvalTask",
    "LoopEngine",
    "get_task",
    "match_label",
    "mmau_string_match",
    "normalize_answer",
    "run_evaluation",
    "score_items",
    "short_answer_match",
]
