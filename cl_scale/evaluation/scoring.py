"""Per-task scores from generated answers: normalised exact match and ROUGE-L, both on a 0-100 scale.

These follow the SuperNI scoring the published numbers used: every prediction is scored against each of
its references and keeps the best, and a task's score is the plain mean over its examples.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from typing import Literal

from rouge_score import rouge_scorer

from cl_scale.errors import CLScaleError

Metric = Literal["rouge", "exact"]

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")
# Built once: the scorer holds a Porter stemmer and is reused for every prediction.
_ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace, so formatting never decides a match."""
    return _WHITESPACE.sub(" ", s.lower().translate(_PUNCTUATION)).strip()


def _best_over(pred: str, refs: Sequence[str], score: Callable[[str, str], float]) -> float:
    """The best score of `pred` over its references; an example without references cannot be scored."""
    if isinstance(refs, str):
        raise TypeError("refs must be a list of reference strings, not one string (read per character)")
    if not refs:
        raise CLScaleError(
            f"prediction {pred!r} has no reference answer to be scored against",
            "check the task's test split: every example needs at least one output",
        )
    return max(score(pred, ref) for ref in refs)


def exact_match(pred: str, refs: Sequence[str]) -> float:
    """100.0 if the normalised prediction equals some normalised reference, else 0.0."""
    return _best_over(pred, refs, lambda p, r: 100.0 if normalize_answer(p) == normalize_answer(r) else 0.0)


def rouge_l(pred: str, refs: Sequence[str]) -> float:
    """ROUGE-L F-measure x100 (rouge-score tokenisation, Porter stemming), best over references."""
    return _best_over(pred, refs, lambda p, r: 100.0 * _ROUGE_L.score(r, p)["rougeL"].fmeasure)


_SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {"rouge": rouge_l, "exact": exact_match}


def score_predictions(
    preds: Sequence[str], refs: Sequence[Sequence[str]], metric: Metric
) -> tuple[float, list[float]]:
    """Score one task: (mean over examples, per-example scores), with `metric` "rouge" or "exact"."""
    if metric not in _SCORERS:
        raise CLScaleError(
            f"unknown task metric {metric!r}", f"use one of: {', '.join(sorted(_SCORERS))}"
        )
    if len(preds) != len(refs):
        raise CLScaleError(
            f"{len(preds)} predictions but {len(refs)} reference lists: they must pair up one to one",
            "regenerate the predictions for this task with `cl-scale eval RUN_DIR`",
        )
    if not preds:
        raise CLScaleError(
            "no predictions to score: a task score of an empty test set is undefined",
            "check that the task's test split is not empty",
        )
    per_example = [_SCORERS[metric](pred, ref_list) for pred, ref_list in zip(preds, refs)]
    return sum(per_example) / len(per_example), per_example
