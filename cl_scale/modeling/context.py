"""The per-forward state every branched layer reads: gate coefficients, token masks, penalty terms.

The wrapper fills it once per forward (or once per generation), so the coefficients are computed
from the prompt a single time and every branched layer of the model sees the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BranchContext:
    """Shared, mutable state for one forward pass of a branched model."""

    coefficients: torch.Tensor | None = None
    """(batch, tasks) gate coefficients, or None when every branch has coefficient 1."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    """Token masks (batch, seq) keyed by the stream a layer reads: "source" or "target"."""

    penalties: dict[str, torch.Tensor] = field(default_factory=dict)
    """Loss terms that layers add inside their forward (where ZeRO-3 has the parameters gathered)."""

    def add_penalty(self, name: str, value: torch.Tensor) -> None:
        """Accumulate a penalty term under `name`."""
        previous = self.penalties.get(name)
        self.penalties[name] = value if previous is None else previous + value

    def reset(self) -> None:
        """Forget everything from the previous forward."""
        self.coefficients = None
        self.masks = {}
        self.penalties = {}
