"""A built-in instruction suite: no downloads, exact short answers, deterministic from a seed.

The list tasks all read the same inputs (a few distinct letters) and demand different outputs, so
training one in sequence damages another and forgetting is measurable. The vocabulary is tiny so a
small model with a small tokenizer learns each task in a few hundred steps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset

from cl_scale.data.benchmark import SPLITS
from cl_scale.data.examples import make_examples
from cl_scale.data.names import unknown_name
from cl_scale.data.prompts import build_prompt
from cl_scale.errors import CLScaleError

SYNTHETIC_BENCHMARK = "Synthetic"
DEFAULT_N_TRAIN = 512
DEFAULT_N_TEST = 64

_LETTERS = "abcdefghij"
_LIST_LENGTHS = range(3, 7)
_MAX_ADDEND = 49


def _letter_list(rng: random.Random) -> str:
    return " ".join(rng.sample(_LETTERS, rng.choice(_LIST_LENGTHS)))


def _sum_input(rng: random.Random) -> str:
    return f"{rng.randint(0, _MAX_ADDEND)} + {rng.randint(0, _MAX_ADDEND)}"


@dataclass(frozen=True)
class _Family:
    """A kind of input shared by several tasks, with how many distinct inputs exist."""

    draw: Callable[[random.Random], str]
    capacity: int


_FAMILIES = {
    "list": _Family(_letter_list, sum(math.perm(len(_LETTERS), k) for k in _LIST_LENGTHS)),
    "sum": _Family(_sum_input, (_MAX_ADDEND + 1) ** 2),
}


@dataclass(frozen=True)
class _Task:
    definition: str
    family: str
    solve: Callable[[str], str]


def _rotate(x: str) -> str:
    return " ".join(_LETTERS[(_LETTERS.index(i) + 1) % len(_LETTERS)] for i in x.split())


def _swap_ends(x: str) -> str:
    items = x.split()
    return " ".join([items[-1], *items[1:-1], items[0]])


_TASKS: dict[str, _Task] = {
    "reverse": _Task("Reverse the list.", "list", lambda x: " ".join(reversed(x.split()))),
    "sort": _Task("Sort the list alphabetically.", "list", lambda x: " ".join(sorted(x.split()))),
    "first": _Task("Give the first item of the list.", "list", lambda x: x.split()[0]),
    "last": _Task("Give the last item of the list.", "list", lambda x: x.split()[-1]),
    "upper": _Task("Write the list in capital letters.", "list", lambda x: x.upper()),
    "count": _Task("Count the items in the list.", "list", lambda x: str(len(x.split()))),
    "add": _Task("Add the two numbers.", "sum", lambda x: str(sum(int(n) for n in x.split(" + ")))),
}

# Pre-training tasks: other operations on the same inputs, so a base learns the format, not the demo tasks.
_PRETRAINING: dict[str, _Task] = {
    "copy": _Task("Copy the list.", "list", lambda x: x),
    "rotate": _Task("Replace every letter by the next one.", "list", _rotate),
    "drop_first": _Task("Remove the first item.", "list", lambda x: " ".join(x.split()[1:])),
    "double": _Task("Write every item twice.", "list", lambda x: " ".join(f"{i} {i}" for i in x.split())),
    "swap_ends": _Task("Swap the first and the last item.", "list", _swap_ends),
}

SYNTHETIC_TASKS: list[str] = list(_TASKS)


def _distinct_inputs(family: str, stream: str, n: int, seed: int, exclude: set[str]) -> list[str]:
    """`n` distinct inputs of a family from a seeded stream, none of them in `exclude`."""
    spec = _FAMILIES[family]
    if n + len(exclude) > spec.capacity:
        raise CLScaleError(
            f"the synthetic {family!r} tasks have only {spec.capacity} distinct inputs; "
            f"{n} more than the {len(exclude)} already used were asked for",
            "ask for fewer synthetic examples (data.max_train_examples / data.max_eval_examples)",
        )
    rng = random.Random(f"synthetic:{family}:{stream}:{seed}")
    chosen: dict[str, None] = {}
    while len(chosen) < n:
        candidate = spec.draw(rng)
        if candidate not in exclude:
            chosen[candidate] = None
    return list(chosen)


def _split_inputs(family: str, split: str, n_train: int, n_test: int, seed: int) -> list[str]:
    """Inputs of a split; dev and test never repeat a training input. Same for every task of the family."""
    train = _distinct_inputs(family, "train", n_train, seed, set())
    return train if split == "train" else _distinct_inputs(family, split, n_test, seed, set(train))


def _examples(rows: list[tuple[str, _Task, str]], split: str) -> Dataset:
    """Examples from (task name, task, input) rows; ids number the rows within the split."""
    answers = [task.solve(x) for _, task, x in rows]
    return make_examples(
        {
            "id": [f"{name}-{split}-{i}" for i, (name, _, _) in enumerate(rows)],
            "task": [name for name, _, _ in rows],
            "definition": [task.definition for _, task, _ in rows],
            "input": [x for _, _, x in rows],
            "references": [[a] for a in answers],
            "target": answers,
        }
    )


def load_synthetic(
    task: str, split: str, *, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST, seed: int = 0
) -> Dataset:
    """One split of a synthetic task with the benchmark example columns; dev and test hold `n_test` each."""
    if task not in _TASKS:
        raise unknown_name("synthetic task", task, _TASKS)
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    spec = _TASKS[task]
    inputs = _split_inputs(spec.family, split, n_train, n_test, seed)
    return _examples([(task, spec, x) for x in inputs], split)


def pretraining_examples(n: int, seed: int = 0) -> Dataset:
    """`n` examples of pre-training tasks (copy, rotate, ...), disjoint from the suite's tasks."""
    rng = random.Random(f"pretraining:{seed}")
    names = sorted(_PRETRAINING)
    rows = []
    for _ in range(n):
        name = rng.choice(names)
        rows.append((name, _PRETRAINING[name], _letter_list(rng)))
    return _examples(rows, "pretrain")


def pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """`n` prompt + answer texts in the "long" format, for pre-training a small causal base."""
    ds = pretraining_examples(n, seed)
    return [build_prompt(d, x, "long") + t for d, x, t in zip(ds["definition"], ds["input"], ds["target"])]
