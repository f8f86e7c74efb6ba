"""A run's diagnostics: N-LoRA's branch numbers from the last snapshot, GainLoRA's gate matrix, diagnostics.json.

The branch numbers need only the snapshot file (no model), since every branch of the last stage is stored
under the names cl_scale.rundir.branch_tensor_name gives. A run with one branch (SeqLoRA, or a single finished stage)
has no pair of tasks, so it gets none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cl_scale import atomic
from cl_scale.errors import CLScaleError, read_safetensors
from cl_scale.evaluation.diagnostics import BranchDiagnostics, Branches, branch_diagnostics
from cl_scale.rundir import parse_branch_tensor_name

if TYPE_CHECKING:
    from cl_scale.recipe import MethodConfig

DIAGNOSTICS_JSON = "diagnostics.json"


def _mismatch(path: Path, what: str) -> CLScaleError:
    return CLScaleError(
        f"stage snapshot {path} does not match the run's recipe ({what})",
        "use the run directory the snapshot was trained in; its recipe.yaml must be the original one",
    )


def snapshot_branches(path: Path, rank: int) -> Branches:
    """{module: [(A_i, B_i) per task]} from a stage snapshot, checked against the recipe's LoRA rank."""
    tensors = read_safetensors(
        path, problem=f"stage snapshot {path} cannot be read", fix="the stage is damaged; retrain it"
    )
    parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        parsed = parse_branch_tensor_name(name)
        if parsed is not None:
            module, part, index = parsed
            parts.setdefault(module, {}).setdefault(index, {})[part] = tensor
    branches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, by_index in parts.items():
        if sorted(by_index) != list(range(len(by_index))) or any(len(p) != 2 for p in by_index.values()):
            raise _mismatch(path, f"{module} lacks an A or B of some branch")
        branches[module] = [(by_index[i]["A"], by_index[i]["B"]) for i in range(len(by_index))]
        if any(A.shape[0] != rank for A, _ in branches[module]):
            found = branches[module][0][0].shape[0]
            raise _mismatch(path, f"{module} has branches of rank {found}, the recipe says {rank}")
    return branches


def run_branch_diagnostics(snapshot: Path, method_cfg: MethodConfig) -> BranchDiagnostics | None:
    """N-LoRA's collision rate and orthogonality of the snapshot's branches; None with fewer than two."""
    branches = snapshot_branches(snapshot, method_cfg.rank)
    if not branches or len(next(iter(branches.values()))) < 2:
        return None
    return branch_diagnostics(branches, method_cfg.alpha / method_cfg.rank)


def branch_diagnostics_from_dict(data: dict[str, float]) -> BranchDiagnostics:
    """Inverse of `BranchDiagnostics.as_dict`, for a stored diagnostics.json."""
    return BranchDiagnostics(
        collision_rate=data["parameter_collision_rate"],
        collision_tol=data["collision_tolerance"],
        orthogonality=data["task_orthogonality"],
    )


def read_diagnostics(folder: Path, stages: int) -> dict[str, Any] | None:
    """The stored diagnostics of `folder` when they were computed after the same number of stages."""
    path = folder / DIAGNOSTICS_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("stages") == stages else None


def write_diagnostics(folder: Path, data: dict[str, Any]) -> None:
    """Write diagnostics.json atomically."""
    atomic.write_json(folder / DIAGNOSTICS_JSON, data)
