import re

import pytest

from cl_scale.data.examples import EXAMPLE_FEATURES
from cl_scale.data.synthetic import SYNTHETIC_TASKS, load_synthetic, pretraining_examples, pretraining_texts
from cl_scale.errors import CLScaleError

LIST_TASKS = ["reverse", "sort", "first", "last", "upper", "count"]

SOLVERS = {
    "reverse": lambda x: " ".join(x.split()[::-1]),
    "sort": lambda x: " ".join(sorted(x.split())),
    "first": lambda x: x.split()[0],
    "last": lambda x: x.split()[-1],
    "upper": lambda x: x.upper(),
    "count": lambda x: str(len(x.split())),
    "add": lambda x: str(int(x.split(" + ")[0]) + int(x.split(" + ")[1])),
}


def test_suite_has_at_least_six_tasks() -> None:
    assert len(SYNTHETIC_TASKS) >= 6


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_answers_are_correct(task: str) -> None:
    ds = load_synthetic(task, "train", n_train=50)
    assert ds["target"][:] == [SOLVERS[task](x) for x in ds["input"]]


def test_same_seed_gives_the_same_examples() -> None:
    assert load_synthetic("sort", "train", seed=7)[:] == load_synthetic("sort", "train", seed=7)[:]


def test_another_seed_gives_other_examples() -> None:
    assert load_synthetic("sort", "train", seed=7)["input"][:] != load_synthetic("sort", "train", seed=8)["input"][:]


def test_list_tasks_share_their_inputs() -> None:
    inputs = {task: load_synthetic(task, "test", seed=3)["input"][:] for task in LIST_TASKS}
    assert all(inputs[task] == inputs["reverse"] for task in LIST_TASKS)


@pytest.mark.parametrize(("a", "b"), [("reverse", "sort"), ("reverse", "last"), ("sort", "last"), ("first", "last")])
def test_shared_input_tasks_demand_different_outputs(a: str, b: str) -> None:
    ta, tb = (load_synthetic(t, "test", seed=3)["target"][:] for t in (a, b))
    assert sum(x != y for x, y in zip(ta, tb)) > 0.7 * len(ta)


def test_dev_and_test_inputs_never_appear_in_train() -> None:
    train = set(load_synthetic("reverse", "train", n_train=5000)["input"])
    held_out = load_synthetic("reverse", "test", n_train=5000)["input"][:] + load_synthetic(
        "reverse", "dev", n_train=5000
    )["input"][:]
    assert not train & set(held_out)


def test_sizes_are_configurable() -> None:
    assert len(load_synthetic("count", "train", n_train=10)) == 10
    assert len(load_synthetic("count", "dev", n_test=7)) == 7


def test_default_sizes_are_modest() -> None:
    assert (len(load_synthetic("count", "train")), len(load_synthetic("count", "test"))) == (512, 64)


def test_examples_have_the_benchmark_schema() -> None:
    assert load_synthetic("upper", "train", n_train=5).features == EXAMPLE_FEATURES


def test_vocabulary_is_small() -> None:
    text = "".join(t for task in SYNTHETIC_TASKS for t in load_synthetic(task, "train")["input"][:])
    answers = "".join(t for task in SYNTHETIC_TASKS for t in load_synthetic(task, "train")["target"][:])
    assert re.fullmatch(r"[a-jA-J0-9 +]*", text + answers)


def test_unknown_task_suggests_a_known_one() -> None:
    with pytest.raises(CLScaleError, match="did you mean 'reverse'"):
        load_synthetic("revers", "train")


def test_asking_for_more_examples_than_exist_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="only 2500 distinct inputs"):
        load_synthetic("add", "train", n_train=3000)


def test_pretraining_texts_are_deterministic_for_a_seed() -> None:
    assert pretraining_texts(20, seed=1) == pretraining_texts(20, seed=1)


def test_pretraining_texts_change_with_the_seed() -> None:
    assert pretraining_texts(20, seed=1) != pretraining_texts(20, seed=2)


def test_pretraining_tasks_are_not_suite_tasks() -> None:
    pre = pretraining_examples(200)
    suite_definitions = {load_synthetic(t, "test", n_test=1)["definition"][0] for t in SYNTHETIC_TASKS}
    assert not set(pre["task"]) & set(SYNTHETIC_TASKS)
    assert not set(pre["definition"]) & suite_definitions


def test_pretraining_texts_are_prompt_then_answer() -> None:
    row = pretraining_examples(1, seed=4)[0]
    assert pretraining_texts(1, seed=4) == [f"{row['definition']}\n{row['input']}\nOutput: {row['target']}"]
