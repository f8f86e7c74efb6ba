"""The model of one finished stage, rebuilt from its snapshot and wrapped in a DeepSpeed engine for inference.

Always an engine, on every rank, so evaluation runs exactly the way training evaluated:
- ZeRO-3: the base was partitioned while loading; only the engine's hooks gather it in a forward.
- ZeRO-1/2 partition optimizer state, which inference has none of (and DeepSpeed refuses them without an
  optimizer), so those configs run as stage 0: every rank holds the whole model, and the engine still
  puts it on this rank's device in the recipe's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cl_scale import distributed as dist_utils


@dataclass
class StageModel:
    """A rebuilt stage: tokenizer, model kind, the continual model and the engine that owns it."""

    state: Any
    engine: Any

    @property
    def model(self) -> Any:
        return self.state.model

    @property
    def tokenizer(self) -> Any:
        return self.state.tokenizer

    @property
    def kind(self) -> str:
        return self.state.kind


def inference_ds_config(recipe: Any, world_size: int) -> dict[str, Any]:
    """The run's DeepSpeed config for inference on `world_size` ranks.

    Evaluation may use another number of ranks than training; no optimizer step happens, so the global
    batch is set to what this world holds and the training layout check cannot refuse it.
    """
    from cl_scale.ds_config import build_ds_config, zero_stage

    train = recipe.train.model_copy(update={"global_batch": recipe.train.per_device_batch * world_size})
    config = build_ds_config(recipe.model_copy(update={"train": train}), world_size)
    if zero_stage(config) != 3:
        config["zero_optimization"] = {"stage": 0}
    return config


@contextmanager
def load_stage_model(recipe: Any, run: Any, index: int) -> Iterator[StageModel]:
    """Build the recipe's model, load stage `index` (0-based) and wrap it; collective, call on every rank.

    A snapshot that does not match the recipe fails in `restore_stage` with one clear message.
    """
    from cl_scale.continual_state import build_state, restore_stage

    config = inference_ds_config(recipe, dist_utils.world_size())
    state = build_state(recipe, config, len(run.tasks))
    restore_stage(state, recipe, run.stage_dir(index), index)
    state.model.requires_grad_(False)
    with dist_utils.deepspeed_engine(state.model, config) as engine:
        engine.eval()
        yield StageModel(state, engine)
