"""N-LoRA's branch diagnostics and GainLoRA's gate matrix, computed from plain tensors (their tables: report.py).

Inputs come from stage snapshots: `branches[module][i] = (A_i, B_i)` with `A_i: r x d_in` and
`B_i: d_out x r` for task i. A full `Delta W = s B A` of a 13B layer is 100 MB in fp32, so the work goes one
module at a time and, inside a module, in blocks of rows whose size is bounded by `_BLOCK_ELEMENTS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch

from cl_scale.errors import CLScaleError

Branches = Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]

DEFAULT_TOL = 1e-6
# At most this many Delta W entries (over all tasks together) are materialised at once.
_BLOCK_ELEMENTS = 1 << 24


def _num_branch_tasks(branches: Branches) -> int:
    """The number of tasks, after checking every module has one well-shaped (A, B) pair per task."""
    if not branches:
        raise CLScaleError("no LoRA branches to analyse", "load the branches of at least one target module")
    counts = {len(pairs) for pairs in branches.values()}
    if len(counts) != 1 or 0 in counts:
        raise CLScaleError(
            f"target modules hold different or zero numbers of task branches ({sorted(counts)})",
            "load every module's branches from the same stage snapshot",
        )
    for module, pairs in branches.items():
        first_A, first_B = pairs[0]
        for i, (A, B) in enumerate(pairs):
            if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise CLScaleError(
                    f"{module}, task {i + 1}: A {tuple(A.shape)} and B {tuple(B.shape)} do not form B @ A",
                    "pass A as (r, d_in) and B as (d_out, r)",
                )
            if A.shape[1] != first_A.shape[1] or B.shape[0] != first_B.shape[0]:
                raise CLScaleError(
                    f"{module}, task {i + 1}: Delta W is {B.shape[0]}x{A.shape[1]}, "
                    f"task 1's is {first_B.shape[0]}x{first_A.shape[1]}",
                    "load the branches of one module per key",
                )
    return counts.pop()


def _pair_overlap_counts(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], scaling: float, tol: float
) -> torch.Tensor:
    """(T, T) counts of entries where both tasks' Delta W exceed `tol` in magnitude, block by block."""
    T = len(pairs)
    d_out, d_in = pairs[0][1].shape[0], pairs[0][0].shape[1]
    rows = max(1, _BLOCK_ELEMENTS // (T * d_in))
    counts = torch.zeros(T, T, dtype=torch.float64, device=pairs[0][0].device)
    for start in range(0, d_out, rows):
        blocks = [scaling * (B[start : start + rows].float() @ A.float()) for A, B in pairs]
        masks = torch.stack([(block.abs() > tol).flatten() for block in blocks]).float()
        # A block holds fewer than 2**24 entries per task, so float32 counts them exactly.
        counts += (masks @ masks.T).double()
    return counts


def parameter_collision_rate(branches: Branches, scaling: float, tol: float = DEFAULT_TOL) -> float:
    """N-LoRA's collision rate: share of Delta W entries non-zero (|v| > tol) for both tasks of a pair.

    The share is over all entries of the layer, averaged over task pairs and modules (every module counts
    the same). Report `tol` with the value: the rate depends on it. One task has no pair, so the rate is 0.0.
    """
    T = _num_branch_tasks(branches)
    if T < 2:
        return 0.0
    num_pairs = T * (T - 1) // 2
    total = 0.0
    for pairs in branches.values():
        overlap = _pair_overlap_counts(pairs, scaling, tol).triu(diagonal=1).sum().item()
        numel = pairs[0][1].shape[0] * pairs[0][0].shape[1]
        total += overlap / (numel * num_pairs)
    return total / len(branches)


def task_orthogonality(branches: Branches) -> float:
    """sum over modules and task pairs i < j of ||A_i A_j^T||_F^2; 0 means mutually orthogonal rows."""
    _num_branch_tasks(branches)
    return sum(
        (Ai.double() @ Aj.double().T).pow(2).sum().item()
        for pairs in branches.values()
        for (Ai, _), (Aj, _) in combinations(pairs, 2)
    )


def gate_matrix(coefs: Mapping[int, torch.Tensor]) -> list[list[float]]:
    """Mean gate coefficients: row i = test inputs of task i (0-based keys), column j = gate of task j.

    A working GainLoRA gate gives a large diagonal and small values below it (old inputs, new gates).
    """
    if not coefs or sorted(coefs) != list(range(len(coefs))):
        raise CLScaleError(
            f"gate coefficients are keyed by tasks {sorted(coefs)}; expected 0..T-1",
            "collect the coefficients on the test inputs of every task",
        )
    shapes = [c.shape for c in coefs.values()]
    if any(len(s) != 2 or s[0] == 0 for s in shapes) or len({s[1] for s in shapes}) != 1:
        raise CLScaleError(
            "gate coefficients must be non-empty (n, gates) tensors with the same number of gates",
            "collect them from one model on every task's test inputs",
        )
    return [coefs[i].double().mean(dim=0).tolist() for i in range(len(coefs))]


@dataclass(frozen=True)
class BranchDiagnostics:
    """N-LoRA's two numbers for one run, with the tolerance the collision rate was counted at."""

    collision_rate: float
    collision_tol: float
    orthogonality: float

    def as_dict(self) -> dict[str, float]:
        """The JSON form `cl-scale eval` stores beside the metrics."""
        return {
            "parameter_collision_rate": self.collision_rate,
            "collision_tolerance": self.collision_tol,
            "task_orthogonality": self.orthogonality,
        }


def branch_diagnostics(branches: Branches, scaling: float, tol: float = DEFAULT_TOL) -> BranchDiagnostics:
    """Both N-LoRA diagnostics of one run's branches."""
    return BranchDiagnostics(
        collision_rate=parameter_collision_rate(branches, scaling, tol),
        collision_tol=tol,
        orthogonality=task_orthogonality(branches),
    )
