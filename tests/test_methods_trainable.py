"""Every method grows and trains exactly what docs/methods.md says; the registry builds them by name."""

from __future__ import annotations

import pytest
import torch
from methods_fixtures import built, method_config, tiny_model

from cl_scale.errors import CLScaleError
from cl_scale.methods import build_method
from cl_scale.methods.base import Method
from cl_scale.methods.gainlora import GainLoRA
from cl_scale.methods.inflora import InfLoRA
from cl_scale.methods.nlora import NLoRA
from cl_scale.methods.olora import OLoRA
from cl_scale.methods.seqlora import SeqLoRA
from cl_scale.modeling.wrapper import ContinualModel


def _grow(method: Method, tasks: int) -> None:
    for task in range(tasks):
        method.grow(task, torch.Generator().manual_seed(task))


def _trainable_names(model: ContinualModel, method: Method, task: int) -> set[str]:
    returned = {id(p) for p in method.trainable_parameters(task)}
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    assert returned == {id(p) for p in model.parameters() if p.requires_grad}
    return names


def _expected(model: ContinualModel, branch: int, *, with_a: bool = True, gate: int | None = None) -> set[str]:
    names = set()
    for path in model.branched:
        names.add(f"base.{path}.lora_B_{branch}")
        if with_a:
            names.add(f"base.{path}.lora_A_{branch}")
    if gate is not None:
        names |= {f"gates.gate_{part}_{gate}" for part in ("W1", "W2", "key")}
    return names


def test_seqlora_reuses_one_branch_for_every_task() -> None:
    model, method = built("seqlora")
    _grow(method, 3)
    assert model.num_branches == 1


def test_seqlora_trains_the_shared_branch_in_every_task() -> None:
    model, method = built("seqlora")
    _grow(method, 3)
    assert _trainable_names(model, method, 2) == _expected(model, 0)


def test_inclora_adds_one_branch_per_task() -> None:
    model, method = built("inclora")
    _grow(method, 3)
    assert model.num_branches == 3


@pytest.mark.parametrize("name", ["inclora", "olora", "nlora"])
def test_incremental_methods_train_a_and_b_of_the_current_branch_only(name: str) -> None:
    model, method = built(name)
    _grow(method, 2)
    assert _trainable_names(model, method, 1) == _expected(model, 1)


def test_inflora_trains_only_b_of_the_current_branch() -> None:
    model, method = built("inflora")
    _grow(method, 2)
    assert _trainable_names(model, method, 1) == _expected(model, 1, with_a=False)


@pytest.mark.parametrize(("branch", "with_a"), [("inflora", False), ("olora", True), ("nlora", True)])
def test_gainlora_trains_its_branch_methods_set_plus_the_current_gate(branch: str, with_a: bool) -> None:
    model, method = built("gainlora", branch=branch)
    _grow(method, 2)
    assert _trainable_names(model, method, 1) == _expected(model, 1, with_a=with_a, gate=1)


def test_gainlora_grows_one_branch_and_one_gate_per_task() -> None:
    model, method = built("gainlora")
    _grow(method, 2)
    assert (model.num_branches, model.gates.num_gates) == (2, 2)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("seqlora", SeqLoRA), ("olora", OLoRA), ("nlora", NLoRA), ("inflora", InfLoRA), ("gainlora", GainLoRA)],
)
def test_registry_builds_the_named_method(name: str, cls: type) -> None:
    assert type(built(name)[1]) is cls


@pytest.mark.parametrize(("branch", "cls"), [("inflora", InfLoRA), ("olora", OLoRA), ("nlora", NLoRA)])
def test_gainlora_composes_the_configured_branch_method(branch: str, cls: type) -> None:
    assert type(built("gainlora", branch=branch)[1].branch_method) is cls


def test_registry_rejects_an_unknown_name_with_a_fix() -> None:
    config = method_config("inclora").model_copy(update={"name": "ewc"})
    with pytest.raises(CLScaleError, match="set method.name"):
        build_method(config, tiny_model(method_config("inclora")), 3)


def test_gainlora_on_a_model_without_gates_is_a_user_error() -> None:
    with pytest.raises(CLScaleError, match="gate bank"):
        build_method(method_config("gainlora"), tiny_model(method_config("inclora")), 3)
