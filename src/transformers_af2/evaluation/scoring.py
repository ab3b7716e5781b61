"""
Scorers: each turns (prediction, item) pairs into a task's numbers, following the benchmark's official rule.

`score_items(scorer_name, records, options)` is the entry point; `records` are the rows of predictions.jsonl (dicts
with at least `prediction` and the fields the reader put there); `options` are the task's scorer options (e.g. its
label aliases). Every scorer returns `(metrics, breakdown)`: `metrics` maps a
metric name to a number (percent for accuracies, as the papers print them), `breakdown` maps a group name (e.g. MMAU's
`sound`) to its own metrics.
"""

from __future__ import annotations

import functools
import re
import string
from collections import defaultdict
from collections.abc import Callable, Sequence

# ---------------------------------------------------------------------------------------------------------------------
# MMAU: the official evaluation.py rule (Sakshi113/MMAU)
# ---------------------------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\b\w+\b")


# Cached: `match_label` runs the rule once per label, and each run reads the words of every label again (L^2 regex
# scans per prediction; 200 labels for FSD50K).
@functools.lru_cache(maxsize=4096)
def _word_set(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def mmau_string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """
    MMAU's official choice matching: a prediction is right when it contains every word of the answer and no word
    that only the wrong choices have. Words are `\\b\\w+\\b` runs, lower-cased, as sets. An empty prediction is
    wrong. A bare choice letter ("B") is wrong too: the official rule knows no letters, and a letter that is also a
    word of a wrong choice ("a" in "A child") makes a "(A) ..." answer wrong as well.
    """
    prediction_words = _word_set(prediction)
    if not prediction_words:
        return False
    answer_words = _word_set(answer)
    wrong_words: set[str] = set()
    for choice in choices:
        choice_words = _word_set(choice)
        if choice_words != answer_words:
            wrong_words |= choice_words - answer_words
    return answer_words <= prediction_words and prediction_words.isdisjoint(wrong_words)


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else 0.0


def score_mmau(records: Sequence[dict]) -> tuple[dict, dict]:
    """Total accuracy and the official script's task / difficulty / sub-category accuracies."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    correct = 0
    for record in records:
        hit = mmau_string_match(record["answer"], record["prediction"], record["choices"])
        correct += hit
        for key in ("task", "difficulty", "sub-category"):
            value = record.get(key)
            if value is not None:
                groups[f"{key}={value}"][0] += hit
                groups[f"{key}={value}"][1] += 1
    breakdown = {name: {"accuracy": _percent(c, n), "count": n} for name, (c, n) in sorted(groups.items())}
    return {"accuracy": _percent(correct, len(records)), "count": len(records)}, breakdown


def mmau_submission(records: Sequence[dict]) -> list[dict]:
    """
    MMAU's official input format: the benchmark file's items, each with the model's answer added. The MMAU README
    names the key `model_prediction` while its evaluation.py reads `model_output`; both are written, so the file
    works with either (and with the submission server, which takes the README's format).
    """
    submission = []
    for record in records:
        entry = {k: v for k, v in record.items() if k not in ("audio", "prompt", "prediction")}
        entry["model_prediction"] = entry["model_output"] = record["prediction"]
        submission.append(entry)
    return submission


# ---------------------------------------------------------------------------------------------------------------------
# Short answers (ClothoAQA) and labels (classification)
# ---------------------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}
_PUNCTUATION = str.maketrans(dict.fromkeys(string.punctuation, " "))


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, number words to digits, single spaces: "Three." and "3" compare equal."""
    words = text.lower().translate(_PUNCTUATION).split()
    return " ".join(_NUMBER_WORDS.get(word, word) for word in words)


def short_answer_match(reference: str, prediction: str) -> bool:
    """
    ClothoAQA's exact-match accuracy on normalised text. A yes/no reference also accepts a prediction whose first
    word is that answer ("yes, a dog barks"), as AF2 tends to answer with a short clause.
    """
    reference, prediction = normalize_answer(reference), normalize_answer(prediction)
    if not prediction:
        return False
    if reference in ("yes", "no"):
        return prediction.split()[0] == reference
    return prediction == reference


def score_clotho_aqa(records: Sequence[dict]) -> tuple[dict, dict]:
    """
    Accuracy on the unanimous questions (all annotators gave the same answer; the number AF papers report), split into
    yes/no and open questions, and accuracy against the annotators' majority answer over every question that has one.
    """
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record in records:
        answers = [normalize_answer(a) for a in record["answers"]]
        majority, votes = max(((a, answers.count(a)) for a in sorted(set(answers))), key=lambda pair: pair[1])
        kind = "yes_no" if majority in ("yes", "no") else "open"
        if votes * 2 > len(answers):
            hit = short_answer_match(majority, record["prediction"])
            for name in ("majority", f"majority_{kind}"):
                groups[name][0] += hit
                groups[name][1] += 1
        if votes == len(answers):
            hit = short_answer_match(majority, record["prediction"])
            for name in ("unanimous", f"unanimous_{kind}"):
                groups[name][0] += hit
                groups[name][1] += 1
    metrics = {f"accuracy_{name}": _percent(c, n) for name, (c, n) in sorted(groups.items())}
    metrics["count"] = len(records)
    breakdown = {name: {"accuracy": _percent(c, n), "count": n} for name, (c, n) in sorted(groups.items())}
    return metrics, breakdown


# Words that deny what follows them up to the end of the clause: "not happy", "no dog barking", "isn't rock".
_NEGATIONS = frozenset(
    {
        "not",
        "no",
        "never",
        "without",
        "neither",
        "nor",
        "cannot",
        "isn",
        "aren",
        "wasn",
        "weren",
        "doesn",
        "don",
        "didn",
    }
)
_CLAUSE_BREAKS = frozenset({"but", "and", "or", "rather", "instead", "though", "although", "however"})


def affirmed_clauses(text: str) -> list[str]:
    """
    The clauses of `text` (split at punctuation), normalised (`normalize_answer`), with what a negation denies left
    out: from a negation word to the end of its clause or the next but / and / or ("not happy but sad" -> "but sad").
    """
    clauses = []
    for clause in re.split(r"[.,;:!?()\[\]\n]", text):
        kept, denied = [], False
        for word in normalize_answer(clause).split():
            if word in _NEGATIONS:
                denied = True
            elif word in _CLAUSE_BREAKS:
                denied = False
                kept.append(word)
            elif not denied:
                kept.append(word)
        if kept:
            clauses.append(" ".join(kept))
    return clauses


@functools.lru_cache(maxsize=4096)
def _phrase(text: str) -> re.Pattern:
    return re.compile(r"(?<!\S)" + re.escape(normalize_answer(text)) + r"(?!\S)")


def _with_aliases(clause: str, aliases: dict[str, Sequence[str]]) -> str:
    """Every alias spelled as its label (longest alias first, whole words)."""
    pairs = sorted(
        ((normalize_answer(alias), normalize_answer(label)) for label, names in aliases.items() for alias in names),
        key=lambda pair: -len(pair[0]),
    )
    for alias, label in pairs:
        if alias:
            clause = re.sub(r"(?<!\S)" + re.escape(alias) + r"(?!\S)", label, clause)
    return clause


def match_label(prediction: str, labels: Sequence[str], aliases: dict[str, Sequence[str]] | None = None) -> str | None:
    """
    The one label a free-text prediction names, or None. Negated mentions do not count ("not happy"); `aliases`
    (label -> other spellings, per dataset) are read as their label. Then, in order: the whole answer is a label;
    exactly one label is named as a phrase; MMAU's word rule against the label set (all of the label's words, none of
    another label's own words) finds exactly one.
    """
    clauses = [_with_aliases(clause, aliases or {}) for clause in affirmed_clauses(prediction)]
    text = " | ".join(clauses)
    for label in labels:
        if [normalize_answer(label)] == clauses:
            return label
    named = [label for label in labels if normalize_answer(label) and _phrase(label).search(text)]
    # A label inside a longer named one ("speech" in "male speech") is not named on its own.
    named = [a for a in named if not any(a != b and _phrase(a).search(normalize_answer(b)) for b in named)]
    if len(named) == 1:
        return named[0]
    if named:
        return None
    found = [label for label in labels if mmau_string_match(label, text, labels)]
    return found[0] if len(found) == 1 else None


def score_classification(records: Sequence[dict], aliases: dict | None = None) -> tuple[dict, dict]:
    """
    Single-label sets (GTZAN, US8K, CREMA-D, ...): accuracy and macro F1 over the label set, a prediction counting as
    the label `match_label` finds with the dataset's `aliases` (none: wrong for every class).
    """
    for record in records:
        if len(record["labels"]) != 1:
            raise ValueError(
                f"item {record.get('id')!r} has {len(record['labels'])} labels; single-label classification needs "
                "one (multi-label sets use the multi_label scorer)."
            )
    label_set = list(records[0]["label_set"]) if records else []
    true_positive: dict[str, int] = defaultdict(int)
    predicted: dict[str, int] = defaultdict(int)
    actual: dict[str, int] = defaultdict(int)
    correct = 0
    for record in records:
        truth = record["labels"][0]
        guess = match_label(record["prediction"], record["label_set"], aliases)
        actual[truth] += 1
        if guess is not None:
            predicted[guess] += 1
        if guess == truth:
            correct += 1
            true_positive[truth] += 1
    f1s = []
    for label in label_set:
        precision_den, recall_den = predicted[label], actual[label]
        if precision_den + recall_den == 0:
            continue  # a class absent from both truth and predictions does not count in the macro mean
        f1s.append(2 * true_positive[label] / (precision_den + recall_den))
    metrics = {
        "accuracy": _percent(correct, len(records)),
        "macro_f1": 100.0 * sum(f1s) / len(f1s) if f1s else 0.0,
        "unmatched": sum(match_label(r["prediction"], r["label_set"], aliases) is None for r in records),
        "count": len(records),
    }
    breakdown = {
        f"label={label}": {"accuracy": _percent(true_positive[label], actual[label]), "count": actual[label]}
        for label in label_set
        if actual[label]
    }
    return metrics, breakdown


def _named_labels(prediction: str, label_set: Sequence[str], aliases: dict | None = None) -> set[str]:
    """
    Labels a multi-label prediction names. Whole label names first, longest first, each taken out of the text once
    found (so FSD50K's "Male speech and man speaking" is one label, not split at its "and", and its "speech" is not
    named again); then the rest's comma / semicolon / "and" separated parts, each matched by `match_label`. Negated
    mentions do not count.
    """
    named = set()
    clauses = [_with_aliases(clause, aliases or {}) for clause in affirmed_clauses(prediction)]
    text = " | ".join(clauses)
    for label in sorted(label_set, key=lambda label: -len(normalize_answer(label))):
        pattern = _phrase(label)
        if normalize_answer(label) and pattern.search(text):
            named.add(label)
            text = pattern.sub(" | ", text)
    for part in re.split(r"[|]| and ", text):
        if part.strip():
            label = match_label(part, label_set, aliases)
            if label is not None:
                named.add(label)
    return named


def _average_precision(scores: Sequence[float], truths: Sequence[int]) -> float | None:
    """Area under the precision-recall curve as sklearn's average_precision_score computes it (ties grouped)."""
    positives = sum(truths)
    if positives == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    precision_recall, hits, seen, previous_recall, total = [], 0, 0, 0.0, 0.0
    index = 0
    while index < len(order):
        score = scores[order[index]]
        while index < len(order) and scores[order[index]] == score:
            hits += truths[order[index]]
            seen += 1
            index += 1
        recall = hits / positives
        precision_recall.append((hits / seen, recall))
    for precision, recall in precision_recall:
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def score_multi_label(records: Sequence[dict], aliases: dict | None = None) -> tuple[dict, dict]:
    """
    Multi-label sets (FSD50K): the labels a prediction names (its comma / "and" separated parts, each matched by
    `match_label`) against the true ones: micro F1, and mAP over the classes with the named labels as 0/1 scores
    (a generated answer has no ranking; this is the mAP of hard decisions).
    """
    label_set = list(records[0]["label_set"])
    named = [_named_labels(r["prediction"], r["label_set"], aliases) for r in records]
    truths = [set(r["labels"]) for r in records]
    tp = sum(len(n & t) for n, t in zip(named, truths))
    fp = sum(len(n - t) for n, t in zip(named, truths))
    fn = sum(len(t - n) for n, t in zip(named, truths))
    aps = []
    for label in label_set:
        ap = _average_precision([float(label in n) for n in named], [int(label in t) for t in truths])
        if ap is not None:
            aps.append(ap)
    metrics = {
        "micro_f1": 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "mAP": 100.0 * sum(aps) / len(aps) if aps else 0.0,
        "count": len(records),
    }
    return metrics, {}


# ---------------------------------------------------------------------------------------------------------------------
# Captioning: aac-metrics
# ---------------------------------------------------------------------------------------------------------------------


def score_captioning(records: Sequence[dict]) -> tuple[dict, dict]:
    """CIDEr-D (and SPICE, SPIDEr when Java and the Stanford models are there) through aac-metrics."""
    from .caption_metrics import caption_scores

    candidates = [record["prediction"] for record in records]
    references = [record["references"] for record in records]
    metrics, skipped = caption_scores(candidates, references)
    metrics["count"] = len(records)
    breakdown = {f"skipped {name}": {"reason": reason} for name, reason in skipped.items()}
    return metrics, breakdown


SCORERS: dict[str, Callable[[Sequence[dict]], tuple[dict, dict]]] = {
    "mmau": score_mmau,
    "clotho_aqa": score_clotho_aqa,
    "classification": score_classification,
    "multi_label": score_multi_label,
    "captioning": score_captioning,
}


def score_items(scorer: str, records: Sequence[dict], options: dict | None = None) -> tuple[dict, dict]:
    """`(metrics, breakdown)` of `records` by the scorer named `scorer`, with the task's scorer `options`."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r} is not one of {sorted(SCORERS)}.")
    return SCORERS[scorer](records, **(options or {}))
