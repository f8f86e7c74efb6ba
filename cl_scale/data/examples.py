"""The one example schema every task source produces, so the trainer never cares where examples came from."""

from __future__ import annotations

import random

from datasets import Dataset, DatasetInfo, Features, List, Value
from datasets.table import InMemoryTable

from cl_scale.errors import CLScaleError

EXAMPLE_FEATURES = Features(
    {
        "id": Value("string"),
        "task": Value("string"),
        "definition": Value("string"),
        "input": Value("string"),
        "references": List(Value("string")),
        "target": Value("string"),
    }
)


def draw_target(references: list[str], example_id: str, seed: int) -> str:
    """The training target among several references, seeded per example so it ignores subsetting and order."""
    if len(references) == 1:
        return references[0]
    return random.Random(f"{seed}:{example_id}").choice(references)


def subset_indices(n: int, max_examples: int | None, seed: int) -> list[int]:
    """A seeded subset of `range(n)` in original order; all indices when no cap or the cap is not smaller."""
    if max_examples is None or max_examples >= n:
        return list(range(n))
    if max_examples < 1:
        raise CLScaleError(f"max examples is {max_examples}", "use a positive number, or leave it unset for all")
    return sorted(random.Random(seed).sample(range(n), max_examples))


def make_examples(columns: dict[str, list]) -> Dataset:
    """A Dataset with the example schema (id, task, definition, input, references, target)."""
    # Straight to Arrow with the schema: Dataset.from_dict encodes row by row, slow on 7600-example splits.
    table = InMemoryTable.from_pydict(columns, schema=EXAMPLE_FEATURES.arrow_schema)
    return Dataset(table, info=DatasetInfo(features=EXAMPLE_FEATURES))
