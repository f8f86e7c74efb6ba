"""The recipe's model at stage k: build the continual model and method, bring them to any finished stage.

The one place that knows how: training builds it (and restores finished stages on resume), evaluation
and `generate` load a stage into an inference engine (`load_stage_model`), and a single device without
DeepSpeed (notebooks, export) restores a stage into the plain model. So the model a stage is evaluated,
answered or exported with is built exactly the way it was trained.

Inference always runs under an engine, on every rank, the way training evaluated:
- ZeRO-3: the base was partitioned while loading; only the engine's hooks gather it in a forward.
- ZeRO-1/2 partition optimizer state, which inference has none of (and DeepSpeed refuses them without an
  optimizer), so those configs run as stage 0: every rank holds the whole model, and the engine still
  puts it on this rank's device in the recipe's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cl_scale import distributed as dist_utils
from cl_scale.distributed import LocalAccess
from cl_scale.ds_config import build_ds_config, zero_stage
from cl_scale.errors import CLScaleError, read_safetensors
from cl_scale.methods import build_method, method_class
from cl_scale.modeling.loading import load_base_model, load_tokenizer, model_dir
from cl_scale.modeling.wrapper import ContinualModel
from cl_scale.recipe import load_recipe
from cl_scale.rundir import METHOD_STATE, RECIPE_YAML, SNAPSHOT, open_run

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from cl_scale.methods.base import Method
    from cl_scale.recipe import Recipe
    from cl_scale.rundir import RunDir

@dataclass
class ContinualState:
    """Tokenizer, wrapped model and method of one run, in one process."""

    tokenizer: PreTrainedTokenizerBase
    kind: str
    model: ContinualModel
    method: Method
    zero3_handle: HfDeepSpeedConfig | None
    """Keeps transformers' ZeRO-3 integration alive while the model is in use."""


def resolve_stage(run: RunDir, stage: int | None) -> int:
    """The 0-based index of 1-based `stage` (default: the last of the stages finished in order), checked."""
    finished = run.finished_prefix()
    if finished == 0:
        raise CLScaleError(
            f"{run.path} has no finished stage",
            f"finish at least one stage: cl-scale train {run.path / 'recipe.yaml'} --run-dir {run.path} --resume",
        )
    index = (finished if stage is None else stage) - 1
    if not 0 <= index < finished:
        raise CLScaleError(
            f"{run.path} has {finished} finished stage(s); stage {index + 1} does not exist",
            f"pick --stage between 1 and {finished}",
        )
    return index


def open_run_recipe(run_dir: str | Path) -> tuple[RunDir, Recipe]:
    """The run directory and the recipe it was trained with."""
    run = open_run(Path(run_dir))
    return run, load_recipe(run.path / RECIPE_YAML)


def build_state(recipe: Recipe, ds_config: dict[str, Any] | None, num_tasks: int) -> ContinualState:
    """Load the frozen base (partitioned under ZeRO-3), wrap it and create the recipe's method."""
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
        gate_hidden=method_cfg.gate.hidden if method_class(method_cfg.name).gated else None,
    )
    method = build_method(method_cfg, model, num_tasks)
    return ContinualState(tokenizer, loaded.kind, model, method, loaded.zero3_handle)


def stage_generator(recipe: Recipe, index: int) -> torch.Generator:
    """The seeded generator stage `index` grows its parameters from: the same on every rank and on resume."""
    return torch.Generator().manual_seed(recipe.train.seed * 7919 + index)


def restore_stage(state: ContinualState, recipe: Recipe, stage_dir: Path, stage_index: int) -> None:
    """Grow stages 0..stage_index and load their values from `stage_dir` (before any engine is built)."""
    for index in range(stage_index + 1):
        state.method.grow(index, stage_generator(recipe, index))
    problem = f"stage snapshot in {stage_dir} cannot be read"
    fix = "the stage is damaged: delete the stage folder and resume the run to retrain it"
    snapshot = read_safetensors(stage_dir / SNAPSHOT, problem=problem, fix=fix)
    method_state = read_safetensors(stage_dir / METHOD_STATE, problem=problem, fix=fix)
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


@dataclass
class StageModel:
    """A rebuilt stage: tokenizer, model kind, the continual model and the engine that owns it."""

    state: ContinualState
    engine: nn.Module

    @property
    def model(self) -> ContinualModel:
        return self.state.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.state.tokenizer

    @property
    def kind(self) -> str:
        return self.state.kind


def inference_ds_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """The run's DeepSpeed config for inference on `world_size` ranks.

    Evaluation may use another number of ranks than training; no optimizer step happens, so the global
    batch is set to what this world holds and the training layout check cannot refuse it.
    """
    train = recipe.train.model_copy(update={"global_batch": recipe.train.per_device_batch * world_size})
    config = build_ds_config(recipe.model_copy(update={"train": train}), world_size)
    if zero_stage(config) != 3:
        config["zero_optimization"] = {"stage": 0}
    return config


@contextmanager
def load_stage_model(recipe: Recipe, run: RunDir, index: int) -> Iterator[StageModel]:
    """Build the recipe's model, load stage `index` (0-based) and wrap it; collective, call on every rank.

    A snapshot that does not match the recipe fails in `restore_stage` with one clear message.
    """
    config = inference_ds_config(recipe, dist_utils.world_size())
    state = build_state(recipe, config, len(run.tasks))
    restore_stage(state, recipe, run.stage_dir(index), index)
    state.model.requires_grad_(False)
    with dist_utils.deepspeed_engine(state.model, config) as engine:
        engine.eval()
        yield StageModel(state, engine)
