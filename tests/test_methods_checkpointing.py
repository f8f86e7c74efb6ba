"""Penalty terms computed inside layer forwards are the same with and without activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from methods_fixtures import built, task_batches


def _penalised_step(name: str, checkpointing: bool) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Loss terms and gradients of one task-2 step of `name` (penalties active: old branch present)."""
    model, method = built(name, num_tasks=2, olora={"lambda_orth": 0.5, "lambda_l2": 0.1})
    if checkpointing:
        model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for task in range(2):
        method.grow(task, torch.Generator().manual_seed(task))
    for layer in model.branched.values():  # non-zero old and new B so every term is non-trivial
        for a, b in layer.branches():
            with torch.no_grad():
                b.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
    params = method.trainable_parameters(1)
    model.train()
    batch = task_batches(1)[0]
    output = model(**batch)
    loss, terms = method.loss(output.loss, model.context)
    loss.backward()
    return {k: float(v) for k, v in terms.items()}, [p.grad.clone() for p in params]


@pytest.mark.parametrize("name", ["olora", "nlora"])
def test_penalties_and_gradients_do_not_change_under_gradient_checkpointing(name: str) -> None:
    plain_terms, plain_grads = _penalised_step(name, checkpointing=False)
    ckpt_terms, ckpt_grads = _penalised_step(name, checkpointing=True)
    assert len(plain_terms) > 1 and all(v > 0 for v in plain_terms.values())
    assert ckpt_terms == pytest.approx(plain_terms, rel=1e-6)
    for ours, theirs in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
