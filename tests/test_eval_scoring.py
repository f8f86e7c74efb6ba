"""Exact match and ROUGE-L on strings whose scores are worked out by hand."""

from __future__ import annotations

import pytest

from cl_scale.errors import CLScaleError
from cl_scale.evaluation import scoring
from cl_scale.evaluation.scoring import exact_match, normalize_answer, rouge_l, score_predictions


def test_normalize_lowercases_strips_punctuation_collapses_whitespace() -> None:
    assert normalize_answer("  The  Cat!\n") == "the cat"


def test_normalize_keeps_articles() -> None:
    assert normalize_answer("A dog.") == "a dog"


def test_exact_match_after_normalisation() -> None:
    assert exact_match("The  Cat!", ["the cat"]) == 100.0


def test_exact_match_different_words_score_zero() -> None:
    assert exact_match("a cat", ["the cat"]) == 0.0


def test_exact_match_takes_best_reference() -> None:
    assert exact_match("dog", ["cat", "Dog."]) == 100.0


def test_rouge_l_equal_lengths_by_hand() -> None:
    # LCS of (the cat sat on the mat) and (the cat is on a mat) is "the cat on mat": P = R = 4/6.
    assert rouge_l("the cat sat on the mat", ["the cat is on a mat"]) == pytest.approx(100 * 4 / 6)


def test_rouge_l_f_measure_by_hand() -> None:
    # LCS "black": P = 1/3, R = 1/5, F = 2PR / (P + R) = 1/4.
    assert rouge_l("a black dog", ["the black cat sat here"]) == pytest.approx(25.0)


def test_rouge_l_uses_porter_stemming() -> None:
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)


def test_rouge_l_takes_best_reference() -> None:
    # Against the second reference: LCS "black", P = 1/3, R = 1/2, F = 2/5.
    assert rouge_l("a black dog", ["the black cat sat here", "black cat"]) == pytest.approx(40.0)


def test_rouge_scorer_is_not_built_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("RougeScorer constructed during a call")

    monkeypatch.setattr(scoring.rouge_scorer, "RougeScorer", refuse)
    assert rouge_l("the cat", ["the cat"]) == pytest.approx(100.0)


def test_example_without_references_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="no reference"):
        exact_match("yes", [])


def test_score_predictions_returns_mean_and_per_example() -> None:
    score, per_example = score_predictions(["yes", "No.", "maybe"], [["yes"], ["no"], ["no"]], "exact")
    assert per_example == [100.0, 100.0, 0.0]
    assert score == pytest.approx(200 / 3)


def test_score_predictions_with_rouge() -> None:
    preds = ["a black dog", "the cat"]
    score, per_example = score_predictions(preds, [["the black cat sat here"], ["the cat"]], "rouge")
    assert per_example == pytest.approx([25.0, 100.0])
    assert score == pytest.approx(62.5)


def test_score_predictions_empty_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="no predictions"):
        score_predictions([], [], "rouge")


def test_score_predictions_length_mismatch_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="pair up"):
        score_predictions(["a", "b"], [["a"]], "exact")


def test_score_predictions_unknown_metric_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="unknown task metric"):
        score_predictions(["a"], [["a"]], "bleu")  # type: ignore[arg-type]
