"""Build a recipe's continual model and method, and bring them to the state after any finished stage.

Shared by training (resume) and evaluation (`cl-scale eval` / `generate` load a stage snapshot), so the
model a stage is evaluated with is built exactly the way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cl_scale import distributed as dist_utils
from cl_scale.errors import CLScaleError

SNAPSHOT = "snapshot.safetensors"
METHOD_STATE = "method.safetensors"


@dataclass
class ContinualState:
    """Tokenizer, wrapped model and method of one run, in one process."""

    tokenizer: Any
    kind: str
    model: Any
    method: Any
    zero3_handle: Any
    """Keeps transformers' ZeRO-3 integration alive while the model is in use."""


def build_state(recipe: Any, ds_config: dict[str, Any] | None, num_tasks: int) -> ContinualState:
    """Load the frozen base (partitioned under ZeRO-3), wrap it and create the recipe's method."""
    from cl_scale.methods import build_method
    from cl_scale.modeling.loading import load_base_model, load_tokenizer, model_dir
    from cl_scale.modeling.wrapper import ContinualModel

    dist_utils.run_on_main(model_dir, recipe.model)  # builds a built-in model once, before the others load it
    tokenizer = load_tokenizer(recipe.model)
    loaded = load_base_model(recipe.model, ds_config, tokenizer.pad_token_id)
    method_cfg = recipe.method
    model = ContinualModel(
        loaded.model,
        kind=loaded.kind,
        target_modules=recipe.model.target_modules,
        rank=method_cfg.rank,
        alpha=method_cfg.alpha,
        dropout=method_cfg.dropout,
        gate_hidden=method_cfg.gate.hidden if method_cfg.name == "gainlora" else None,
    )
    method = build_method(method_cfg, model, num_tasks)
    return ContinualState(tokenizer, loaded.kind, model, method, loaded.zero3_handle)


def stage_generator(recipe: Any, index: int) -> torch.Generator:
    """The seeded generator stage `index` grows its parameters from: the same on every rank and on resume."""
    return torch.Generator().manual_seed(recipe.train.seed * 7919 + index)


def restore_stage(state: ContinualState, recipe: Any, stage_dir: Path, stage_index: int) -> None:
    """Grow stages 0..stage_index and load their values from `stage_dir` (before any engine is built)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cl_scale.distributed import LocalAccess

    for index in range(stage_index + 1):
        state.method.grow(index, stage_generator(recipe, index))
    try:
        snapshot = load_file(str(stage_dir / SNAPSHOT))
        method_state = load_file(str(stage_dir / METHOD_STATE))
    except (OSError, SafetensorError) as err:
        raise CLScaleError(
            f"stage snapshot in {stage_dir} cannot be read ({err})",
            "the stage is damaged: delete the stage folder and resume the run to retrain it",
        ) from err
    params = state.model.branch_parameters()
    mismatched = sorted(set(snapshot) ^ set(params)) or [
        n for n in params if tuple(snapshot[n].shape) != tuple(getattr(params[n], "ds_shape", params[n].shape))
    ]
    if mismatched:
        raise CLScaleError(
            f"stage snapshot in {stage_dir} does not match the model the recipe builds "
            f"(first mismatching tensor: {mismatched[0]})",
            "use the recipe the run was made with (the run directory's recipe.yaml)",
        )
    names = sorted(params)
    LocalAccess().write([params[n] for n in names], [snapshot[n] for n in names])
    state.method.load_state_tensors(method_state)
