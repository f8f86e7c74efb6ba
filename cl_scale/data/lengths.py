"""Token-length statistics for the data report: how long prompts and answers are, and what gets cut."""

from __future__ import annotations

import math
from dataclasses import dataclass

from datasets import Dataset
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Percentiles:
    p50: int
    p90: int
    p99: int
    max: int


@dataclass(frozen=True)
class LengthStats:
    """Lengths in `unit` ("tokens", or "words" without a tokenizer); truncated counts use the recipe limits."""

    n: int
    unit: str
    prompt: Percentiles
    answer: Percentiles
    truncated_prompts: int
    truncated_answers: int


def _percentiles(lengths: list[int]) -> Percentiles:
    """Nearest-rank percentiles: every value reported is a length that occurs."""
    ordered = sorted(lengths)

    def rank(p: int) -> int:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return Percentiles(rank(50), rank(90), rank(99), ordered[-1])


def _lengths(texts: list[str], tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """Tokens plus the one special token each side carries (BOS or EOS on prompts, EOS on answers)."""
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    return [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_length_stats(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase | None, *, max_source_length: int, max_target_length: int
) -> LengthStats:
    """Percentiles (50/90/99/max) of prompt and answer lengths of a non-empty dataset with prompt/target columns."""
    prompts = _lengths(ds["prompt"][:], tokenizer)
    answers = _lengths(ds["target"][:], tokenizer)
    return LengthStats(
        n=len(prompts),
        unit="words" if tokenizer is None else "tokens",
        prompt=_percentiles(prompts),
        answer=_percentiles(answers),
        truncated_prompts=sum(n > max_source_length for n in prompts),
        truncated_answers=sum(n > max_target_length for n in answers),
    )
