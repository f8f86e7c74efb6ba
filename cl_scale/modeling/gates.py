"""GainLoRA's gate bank: one small gate per task, all evaluated together.

Gate of task i on the gate input `xbar` (mean frozen input embedding of the prompt):

    g_i(xbar) = SiLU(W2_i SiLU(W1_i xbar))                       W1_i: h × d, W2_i: d × h
    a_i       = | 2 sigmoid(4 cos(g_i(xbar), k_i)) - 1 |           (= |tanh(2 cos)|, a(0) = 0)

The parameters of every task are direct parameters of this module (`gate_W1_<i>`, `gate_W2_<i>`,
`gate_key_<i>`), so ZeRO-3 gathers them all when the bank runs; the forward stacks them and uses
batched products, with no Python loop over tasks in the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

GateObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Receives (xbar, hidden, output) of the newest gate: (batch, d), (batch, h), (batch, d)."""


def gate_coefficient(cosine: torch.Tensor) -> torch.Tensor:
    """The map f(cos) = |2 sigmoid(4 cos) - 1| from cosine similarity to a coefficient in [0, 1)."""
    return (2 * torch.sigmoid(4 * cosine) - 1).abs()


class GateBank(nn.Module):
    """Per-task gate MLPs and keys producing (batch, tasks) coefficients from `xbar`."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.hidden = hidden
        self.num_gates = 0
        self.observer: GateObserver | None = None

    def gate(self, index: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """(W1, W2, key) of gate `index`."""
        return (
            getattr(self, f"gate_W1_{index}"),
            getattr(self, f"gate_W2_{index}"),
            getattr(self, f"gate_key_{index}"),
        )

    def add_gate(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> int:
        """Append a freshly initialised gate (Kaiming-uniform MLP, random key of norm sqrt(d/3)).

        Copying the previous gate's MLP (GainLoRA's init for task t >= 2) and designing the key are the
        method's job, done through gathered access once the parameters are partitioned.
        """
        index = self.num_gates
        w1 = torch.empty(self.hidden, self.d_model).uniform_(
            -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model), generator=generator
        )
        w2 = torch.empty(self.d_model, self.hidden).uniform_(
            -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden), generator=generator
        )
        key = torch.randn(self.d_model, generator=generator)
        key = key * (math.sqrt(self.d_model / 3) / key.norm())
        for name, value in (("gate_W1", w1), ("gate_W2", w2), ("gate_key", key)):
            self.register_parameter(f"{name}_{index}", nn.Parameter(value.to(device=device, dtype=dtype)))
        self.num_gates += 1
        return index

    def mlp_outputs(self, xbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, hidden, output) of every gate's MLP on gate inputs `xbar` (batch, d): x is `xbar` in the
        gates' dtype, hidden (batch, tasks, h), output g_i(xbar) (batch, tasks, d). Reads the parameters
        directly: call it from `forward` (where ZeRO-3 has gathered them) or on a bank on one device."""
        w1 = torch.stack([self.gate(i)[0] for i in range(self.num_gates)])  # (T, h, d)
        w2 = torch.stack([self.gate(i)[1] for i in range(self.num_gates)])  # (T, d, h)
        x = xbar.to(w1.dtype)
        hidden = F.silu(torch.einsum("bd,thd->bth", x, w1))
        return x, hidden, F.silu(torch.einsum("bth,tdh->btd", hidden, w2))

    def forward(self, xbar: torch.Tensor) -> torch.Tensor:
        """Coefficients (batch, tasks) for gate inputs `xbar` (batch, d)."""
        x, hidden, output = self.mlp_outputs(xbar)
        if self.observer is not None:
            self.observer(x, hidden[:, -1], output[:, -1])
        keys = torch.stack([self.gate(i)[2] for i in range(self.num_gates)])  # (T, d)
        cosine = F.cosine_similarity(output, keys.unsqueeze(0), dim=-1)
        return gate_coefficient(cosine)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden={self.hidden}, gates={self.num_gates}"
