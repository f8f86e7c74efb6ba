"""BranchedLinear against independent references: PEFT's LoRA and a per-branch loop."""

from __future__ import annotations

import copy

import pytest
import torch
from modeling_fixtures import ALPHA, RANK, VOCAB, continual, copy_branch_into_peft, grown, left_padded, random_tokens
from peft import LoraConfig, get_peft_model
from torch import nn

from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config
from cl_scale.modeling.branched_linear import BranchedLinear
from cl_scale.modeling.context import BranchContext


def test_one_ungated_branch_equals_peft_lora() -> None:
    base = build_tiny_model(tiny_llama_config(VOCAB), seed=0)
    reference = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    model = grown(continual(base, "causal"), tasks=1)
    copy_branch_into_peft(model, reference)
    ids, mask = left_padded([random_tokens(9, seed=2), random_tokens(5, seed=3)])
    expected = reference.eval()(input_ids=ids, attention_mask=mask).logits
    actual = model(ids, mask, mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def _branched(tasks: int, generator: torch.Generator) -> BranchedLinear:
    layer = BranchedLinear(nn.Linear(16, 12), rank=3, alpha=6.0, dropout=0.0, context=BranchContext())
    for _ in range(tasks):
        layer.add_branch(generator)
    with torch.no_grad():
        for _, b in layer.branches():
            b.normal_(generator=generator)
    return layer


def _loop_reference(layer: BranchedLinear, x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """y = W x + b + sum_i c_i s B_i A_i x, one branch at a time."""
    expected = x @ layer.base.weight.T + layer.base.bias
    for i, (a, b) in enumerate(layer.branches()):
        c = coefficients[:, i].view(-1, *([1] * (x.dim() - 1)))
        expected = expected + c * layer.scaling * (x @ a.T @ b.T)
    return expected


@pytest.mark.parametrize("tasks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(5, 16), (5, 7, 16)], ids=["2d", "3d"])
def test_fused_branches_equal_per_branch_loop_with_coefficients(tasks: int, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(tasks)
    layer = _branched(tasks, generator)
    x = torch.randn(shape, generator=generator)
    coefficients = torch.rand(shape[0], tasks, generator=generator)
    layer.context.coefficients = coefficients
    torch.testing.assert_close(layer(x), _loop_reference(layer, x, coefficients), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tasks", [1, 3])
def test_branches_without_coefficients_all_count_once(tasks: int) -> None:
    generator = torch.Generator().manual_seed(10 + tasks)
    layer = _branched(tasks, generator)
    x = torch.randn(4, 6, 16, generator=generator)
    torch.testing.assert_close(layer(x), _loop_reference(layer, x, torch.ones(4, tasks)), atol=1e-5, rtol=1e-5)


def test_layers_of_one_forward_share_one_expansion_of_the_coefficients() -> None:
    context = BranchContext(coefficients=torch.rand(3, 2))
    first = context.rank_coefficients(RANK, 2.0, torch.float32)
    assert context.rank_coefficients(RANK, 2.0, torch.float32) is first
    torch.testing.assert_close(first, 2.0 * context.coefficients.repeat_interleave(RANK, dim=1))


def test_replacing_the_coefficients_rebuilds_their_expansion() -> None:
    context = BranchContext(coefficients=torch.zeros(3, 2))
    context.rank_coefficients(RANK, 1.0, torch.float32)
    context.coefficients = torch.ones(3, 2)
    assert torch.equal(context.rank_coefficients(RANK, 1.0, torch.float32), torch.ones(3, 2 * RANK))
    context.reset()
    with pytest.raises(ValueError, match="no gate coefficients"):
        context.rank_coefficients(RANK, 1.0, torch.float32)


def test_coefficient_gradients_sum_over_the_layers_that_share_them() -> None:
    generator = torch.Generator().manual_seed(7)
    layers = [_branched(3, generator) for _ in range(2)]
    context = BranchContext()
    for layer in layers:
        layer.context = context
    x = torch.randn(4, 5, 16, generator=generator)
    coefficients = torch.rand(4, 3, generator=generator, requires_grad=True)
    context.coefficients = coefficients
    sum(layer(x).square().sum() for layer in layers).backward()
    reference = coefficients.detach().clone().requires_grad_(True)
    sum(_loop_reference(layer, x, reference).square().sum() for layer in layers).backward()
    torch.testing.assert_close(coefficients.grad, reference.grad, rtol=1e-4, atol=1e-4)
