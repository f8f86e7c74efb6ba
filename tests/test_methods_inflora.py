"""InfLoRA: A designed outside the old tasks' input subspace, frozen; bases grow after every task."""

from __future__ import annotations

import math

import pytest
import torch
from methods_fixtures import built, learn, start_task, task_batches

from cl_scale.distributed import LocalAccess
from cl_scale.methods.inflora import InfLoRA
from cl_scale.modeling.wrapper import ContinualModel
from cl_scale.stage_runner import StageRunner
from cl_scale.subspace import collect_layer_inputs, top_directions


def _after_two_tasks(design: str) -> tuple[ContinualModel, InfLoRA]:
    model, method = built("inflora", inflora={"design": design}, threshold=0.95)
    learn(method, model, 0)
    start_task(method, model, 1)
    return model, method


@pytest.mark.parametrize("design", ["svd", "random"])
def test_rows_of_a_are_orthogonal_to_the_old_basis(design: str) -> None:
    model, method = _after_two_tasks(design)
    for path, layer in model.branched.items():
        basis = method.bases[path].vectors
        assert basis.shape[1] > 0
        assert (layer.branch(1)[0].detach() @ basis).abs().max() < 1e-5


@pytest.mark.parametrize("design", ["svd", "random"])
def test_rows_of_a_have_norm_one_over_sqrt_3(design: str) -> None:
    model, _ = _after_two_tasks(design)
    for layer in model.branched.values():
        norms = layer.branch(1)[0].detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 1 / math.sqrt(3)))


def test_only_b_of_the_current_branch_requires_grad() -> None:
    model, _ = _after_two_tasks("svd")
    for layer in model.branched.values():
        (a0, b0), (a1, b1) = layer.branches()
        assert (a0.requires_grad, b0.requires_grad, a1.requires_grad, b1.requires_grad) == (False, False, False, True)


def test_first_task_a_is_the_top_singular_directions_of_its_input_statistic() -> None:
    model, method = built("inflora")
    model.add_branches(torch.Generator().manual_seed(0))
    runner = StageRunner(0, 3, LocalAccess(), model, task_batches(0))
    with collect_layer_inputs(model.branched, model.context) as moments:
        runner.data_pass()
    method.before_task(runner)
    for path, layer in model.branched.items():
        expected = top_directions(moments[path].value(), layer.rank).T / math.sqrt(3)
        torch.testing.assert_close(layer.branch(0)[0].detach(), expected.float())


def test_design_pass_and_basis_pass_are_one_data_pass_each() -> None:
    model, method = built("inflora")
    runner = learn(method, model, 0)
    assert runner.passes == 2


def test_memory_bound_repeats_the_pass_per_group_with_the_same_design() -> None:
    grouped_model, grouped = built("inflora", stats_modules_per_pass=1)
    runner = learn(grouped, grouped_model, 0)
    assert runner.passes == 2 * len(grouped_model.branched)
    model, method = built("inflora")
    learn(method, model, 0)
    for path in model.branched:
        torch.testing.assert_close(grouped_model.branched[path].branch(0)[0], model.branched[path].branch(0)[0])
        torch.testing.assert_close(grouped.bases[path].vectors, method.bases[path].vectors)


def test_bases_grow_and_stay_orthonormal_over_tasks() -> None:
    model, method = built("inflora", threshold=0.95)
    learn(method, model, 0)
    sizes = {path: basis.size for path, basis in method.bases.items()}
    learn(method, model, 1)
    for path, basis in method.bases.items():
        assert basis.size >= sizes[path]
        gram = basis.vectors.T @ basis.vectors
        torch.testing.assert_close(gram, torch.eye(basis.size), atol=1e-5, rtol=0)


def test_state_round_trip_designs_the_same_a() -> None:
    model, method = built("inflora", threshold=0.95)
    learn(method, model, 0)
    reloaded = InfLoRA(method.config, model, 3)
    reloaded.load_state_tensors(method.state_tensors())
    model.add_branches(torch.Generator().manual_seed(1))
    runner = StageRunner(1, 3, LocalAccess(), model, task_batches(1))
    method.before_task(runner)
    designed = [layer.branch(1)[0].detach().clone() for layer in model.branched.values()]
    reloaded.before_task(runner)
    for layer, expected in zip(model.branched.values(), designed, strict=True):
        torch.testing.assert_close(layer.branch(1)[0].detach(), expected, atol=0, rtol=0)
