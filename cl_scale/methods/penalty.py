"""Loss terms on branch parameters whose gradient is computed inside the layer's forward.

A branched layer calls its penalty hook inside its forward, where ZeRO-3 has the parameters gathered.
A plain autograd graph of the penalty would still reference the parameters and be differentiated
whenever autograd reaches it, possibly after ZeRO-3 has released them again, and it would keep large
intermediates alive until backward (N-LoRA's d_out x d_in update: 105 MB per layer at d = 5120).
So the gradient is computed right away and only replayed in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _Replay(torch.autograd.Function):
    """Returns a precomputed scalar; backward scales precomputed gradients by the incoming gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, value: torch.Tensor, grads: tuple[torch.Tensor | None, ...], *inputs: torch.Tensor
    ) -> torch.Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grads = tuple(None if grad is None else grad_output * grad for grad in ctx.grads)
        return (None, None, *grads)


def with_eager_gradient(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """`fn(*tensors)` (a scalar) whose gradients w.r.t. `tensors` are computed now and replayed in backward."""
    needs = [tensor.requires_grad for tensor in tensors]
    if not (torch.is_grad_enabled() and any(needs)):
        with torch.no_grad():
            return fn(*tensors)
    leaves = [tensor.detach().requires_grad_(need) for tensor, need in zip(tensors, needs, strict=True)]
    # Identity hooks keep this small local graph out of activation checkpointing: inside a checkpointed
    # block, unpacking a saved tensor for `autograd.grad` would otherwise re-run the whole block.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        value = fn(*leaves)
        if not value.requires_grad:
            return value
        computed = iter(torch.autograd.grad(value, [leaf for leaf in leaves if leaf.requires_grad], allow_unused=True))
    grads = tuple(next(computed) if need else None for need in needs)
    return _Replay.apply(value.detach(), grads, *tensors)
