"""Which parameters learn in a task: every method freezes the whole model except its chosen set."""

from __future__ import annotations

from torch import nn

from cl_scale.modeling.wrapper import ContinualModel


def train_exactly(model: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter of `model` except `params` and return them (the optimizer is built from them).

    Freezing everything else, not only the previous task's parameters, keeps the trainable set exact
    however the model was grown or reloaded.
    """
    chosen = {id(param) for param in params}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return params


def branch_parameters(model: ContinualModel, index: int, *, with_a: bool = True) -> list[nn.Parameter]:
    """Branch `index` of every branched layer: A and B, or B only (`with_a=False`)."""
    params: list[nn.Parameter] = []
    for layer in model.branched.values():
        a, b = layer.branch(index)
        params.extend((a, b) if with_a else (b,))
    return params
