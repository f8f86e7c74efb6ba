"""O-LoRA's penalty: orthogonality to old A's and L2 on the new branch, as separate named terms."""

from __future__ import annotations

import torch
from methods_fixtures import built, task_batches

from cl_scale.methods.base import Method
from cl_scale.modeling.wrapper import ContinualModel

LAMBDA_ORTH = 0.5
LAMBDA_L2 = 0.1


def _olora(tasks: int) -> tuple[ContinualModel, Method]:
    model, method = built("olora", targets=["q_proj"], olora={"lambda_orth": LAMBDA_ORTH, "lambda_l2": LAMBDA_L2})
    for task in range(tasks):
        method.grow(task, torch.Generator().manual_seed(task))
    method.trainable_parameters(tasks - 1)
    return model, method


def _penalties(model: ContinualModel) -> dict[str, torch.Tensor]:
    model.train()
    model(**task_batches(0)[0])
    return model.context.penalties


def _set_a(model: ContinualModel, index: int, rows: torch.Tensor) -> None:
    with torch.no_grad():
        for layer in model.branched.values():
            layer.branch(index)[0].copy_(rows)


def test_orthogonality_term_is_zero_for_orthogonal_a() -> None:
    model, _ = _olora(2)
    eye = torch.eye(64)
    _set_a(model, 0, eye[:4])
    _set_a(model, 1, eye[4:8])
    assert _penalties(model)["olora_orth"].item() == 0.0


def test_orthogonality_term_matches_a_hand_computation() -> None:
    model, _ = _olora(3)
    expected = sum(
        LAMBDA_ORTH * ((a0 @ a2.T).abs().sum() + (a1 @ a2.T).abs().sum())
        for (a0, _), (a1, _), (a2, _) in (layer.branches() for layer in model.branched.values())
    )
    actual = _penalties(model)["olora_orth"]
    assert actual.item() > 0
    torch.testing.assert_close(actual, expected.detach())


def test_l2_term_matches_a_hand_computation() -> None:
    model, _ = _olora(2)
    with torch.no_grad():
        for layer in model.branched.values():
            layer.branch(1)[1].normal_(generator=torch.Generator().manual_seed(5))
    expected = sum(LAMBDA_L2 * (a.norm() + b.norm()) for a, b in (layer.branch(1) for layer in model.branched.values()))
    torch.testing.assert_close(_penalties(model)["olora_l2"], expected.detach())


def test_orthogonality_gradient_flows_only_into_the_current_a() -> None:
    model, _ = _olora(2)
    _penalties(model)["olora_orth"].backward()
    for layer in model.branched.values():
        (a0, _), (a1, _) = layer.branches()
        expected = LAMBDA_ORTH * torch.sign(a0 @ a1.T).T @ a0
        assert a0.grad is None
        torch.testing.assert_close(a1.grad, expected.detach())


def test_orthogonality_term_is_zero_on_the_first_task() -> None:
    model, _ = _olora(1)
    assert _penalties(model)["olora_orth"].item() == 0.0


def test_penalty_is_removed_after_the_task() -> None:
    model, method = _olora(1)
    method.after_task(None)
    assert _penalties(model) == {}
