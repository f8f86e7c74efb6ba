"""N-LoRA's sparsity penalty: the L1 of the task's update, and the public code's r x r variant."""

from __future__ import annotations

import pytest
import torch
from methods_fixtures import built, task_batches

from cl_scale.errors import CLScaleError
from cl_scale.methods.base import Method
from cl_scale.modeling.wrapper import ContinualModel

LAMBDA = 0.4


def _nlora(variant: str, targets: list[str]) -> tuple[ContinualModel, Method]:
    model, method = built("nlora", targets=targets, nlora={"lambda_l1": LAMBDA, "variant": variant})
    for task in range(2):
        method.grow(task, torch.Generator().manual_seed(task))
    method.trainable_parameters(1)
    with torch.no_grad():
        for layer in model.branched.values():
            layer.branch(1)[1].normal_(generator=torch.Generator().manual_seed(3))
    return model, method


def _penalty(model: ContinualModel) -> torch.Tensor:
    model.train()
    model(**task_batches(1)[0])
    return model.context.penalties["nlora_l1"]


def test_update_penalty_is_the_l1_of_the_scaled_update() -> None:
    model, _ = _nlora("update", ["q_proj", "v_proj"])
    layers = model.branched.values()
    expected = sum(LAMBDA * (layer.scaling * layer.branch(1)[1] @ layer.branch(1)[0]).abs().sum() for layer in layers)
    torch.testing.assert_close(_penalty(model), expected.detach())


def test_update_penalty_gradient_matches_autograd_and_skips_old_branches() -> None:
    model, _ = _nlora("update", ["q_proj"])
    _penalty(model).backward()
    for layer in model.branched.values():
        (a0, _), (a1, b1) = layer.branches()
        a, b = a1.detach().requires_grad_(), b1.detach().requires_grad_()
        (LAMBDA * (layer.scaling * b @ a).abs().sum()).backward()
        torch.testing.assert_close(a1.grad, a.grad)
        torch.testing.assert_close(b1.grad, b.grad)
        assert a0.grad is None


def test_compat_penalty_is_the_l1_of_the_r_by_r_product() -> None:
    model, _ = _nlora("compat", ["q_proj"])
    expected = sum(LAMBDA * (layer.branch(1)[0] @ layer.branch(1)[1]).abs().sum() for layer in model.branched.values())
    torch.testing.assert_close(_penalty(model), expected.detach())


def test_compat_penalty_on_non_square_layers_is_a_user_error() -> None:
    with pytest.raises(CLScaleError, match="v_proj"):
        built("nlora", targets=["v_proj"], nlora={"variant": "compat"})
