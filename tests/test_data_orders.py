from pathlib import Path

import pytest

from cl_scale.data.benchmark import list_tasks
from cl_scale.data.orders import ORDERS, resolve_tasks
from cl_scale.data.synthetic import SYNTHETIC_TASKS
from cl_scale.errors import CLScaleError

BENCHMARK_ORDERS = [name for name in ORDERS if name != "synthetic_demo"]


@pytest.mark.parametrize(
    ("order", "length"),
    [("superni_order1", 15), ("superni_order2", 15), ("long_order3", 15), ("long_order4", 15), ("long_order5", 15),
     ("standard_order1", 4), ("standard_order2", 4), ("standard_order3", 4), ("synthetic_demo", 4)],
)
def test_named_order_has_the_published_length_without_repeats(order: str, length: int) -> None:
    assert len(ORDERS[order]) == length
    assert len(set(ORDERS[order])) == length


def test_the_two_superni_orders_hold_the_same_tasks() -> None:
    assert set(ORDERS["superni_order1"]) == set(ORDERS["superni_order2"])


def test_the_three_long_orders_hold_the_same_tasks() -> None:
    assert set(ORDERS["long_order3"]) == set(ORDERS["long_order4"]) == set(ORDERS["long_order5"])


def test_standard_orders_are_the_published_sequences() -> None:
    assert ORDERS["standard_order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert ORDERS["standard_order2"] == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert ORDERS["standard_order3"] == ["yahoo", "amazon", "agnews", "dbpedia"]


def test_every_benchmark_order_names_real_task_folders(cl_benchmark: Path) -> None:
    folders = {info.name for info in list_tasks(cl_benchmark)}
    assert {task for name in BENCHMARK_ORDERS for task in ORDERS[name]} <= folders


def test_synthetic_demo_order_uses_builtin_tasks() -> None:
    assert set(ORDERS["synthetic_demo"]) <= set(SYNTHETIC_TASKS)


def test_named_order_resolves_to_a_copy() -> None:
    tasks = resolve_tasks("standard_order1", None)
    tasks.append("extra")
    assert ORDERS["standard_order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]


def test_explicit_task_list_is_kept_in_its_order() -> None:
    assert resolve_tasks(None, ["cb", "copa"]) == ["cb", "copa"]


def test_unknown_order_suggests_and_lists_known_orders() -> None:
    with pytest.raises(CLScaleError) as err:
        resolve_tasks("superni_ordr1", None)
    assert "did you mean 'superni_order1'" in err.value.problem
    assert all(name in err.value.fix for name in ORDERS)


def test_order_and_tasks_together_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="both set"):
        resolve_tasks("standard_order1", ["cb"])


def test_neither_order_nor_tasks_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="no tasks"):
        resolve_tasks(None, None)


def test_repeated_task_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="cb more than once"):
        resolve_tasks(None, ["cb", "copa", "cb"])
