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

    stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Each layer's stacked (A, B), kept for the rest of one generation, whose weights cannot change
    between decoding steps (saves two concatenations per layer per token); None otherwise."""

    _expanded: dict[tuple[int, float, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)
    _expanded_from: torch.Tensor | None = field(default=None, repr=False)

    def rank_coefficients(self, rank: int, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """(batch, tasks * rank): each task's coefficient repeated over its `rank` rows, times the LoRA scaling.

        Built once per forward (or per generation) and shared by every layer, so a layer spends no
        kernels on expanding or scaling; rebuilt whenever `coefficients` is replaced.
        """
        if self._expanded_from is not self.coefficients:
            self._expanded, self._expanded_from = {}, self.coefficients
        if self.coefficients is None:
            raise ValueError("no gate coefficients in this forward's context")
        key = (rank, scaling, dtype)
        if key not in self._expanded:
            self._expanded[key] = (self.coefficients.repeat_interleave(rank, dim=1) * scaling).to(dtype)
        return self._expanded[key]

    def add_penalty(self, name: str, value: torch.Tensor) -> None:
        """Accumulate a penalty term under `name`."""
        previous = self.penalties.get(name)
        self.penalties[name] = value if previous is None else previous + value

    def reset(self) -> None:
        """Forget everything from the previous forward."""
        self.coefficients = None
        self.masks = {}
        self.penalties = {}
        self.stacks = None
        self._expanded, self._expanded_from = {}, None
