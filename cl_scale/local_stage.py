"""A finished stage's model on one device, without a DeepSpeed engine or a process group: for notebooks.

`cl-scale generate` runs every rank under an engine because a sharded model needs one; a model that fits
one device needs neither, so this loads the same continual model (same recipe, same snapshot) plainly and
answers prompts the way `generate` does (same tokenisation, same greedy decoding):

    >>> from cl_scale import load_run
    >>> stage = load_run(run_dir)                      # the last finished stage; load_run(run_dir, stage=1)
    >>> answers = stage.generate(["Reverse the words: red green blue"])
    >>> len(answers), type(answers[0]).__name__
    (1, 'str')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cl_scale.continual_state import build_state, open_run_recipe, resolve_stage, restore_stage
from cl_scale.distributed import accelerator_device
from cl_scale.evaluation.gates import gate_coefficients, is_gated
from cl_scale.evaluation.generation import generate_texts
from cl_scale.generate import prompt_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cl_scale.modeling.wrapper import ContinualModel
    from cl_scale.recipe import Recipe


@dataclass
class LocalStage:
    """The continual model after one stage, on this process's device, with what answering prompts needs."""

    recipe: Recipe
    tasks: list[str]
    """The tasks learned up to this stage, oldest first (one gate each for GainLoRA)."""
    tokenizer: PreTrainedTokenizerBase
    kind: str
    model: ContinualModel

    @property
    def stage(self) -> int:
        """The 1-based stage number."""
        return len(self.tasks)

    def generate(self, prompts: Sequence[str]) -> list[str]:
        """Greedy answers to whole prompts, tokenised and truncated like test prompts (as `cl-scale generate`)."""
        eval_cfg = self.recipe.eval
        return generate_texts(
            self.model, self._rows(prompts), self.tokenizer,
            batch_size=eval_cfg.batch_size, max_new_tokens=eval_cfg.max_new_tokens,
        )

    def gates(self, prompts: Sequence[str]) -> dict[str, list[float]] | None:
        """Each task's gate coefficient on each prompt (GainLoRA); None for a model without gates."""
        if not is_gated(self.model):
            return None
        coefs = gate_coefficients(self.model, self._rows(prompts), batch_size=self.recipe.eval.batch_size)
        return {task: coefs[:, i].tolist() for i, task in enumerate(self.tasks)}

    def _rows(self, prompts: Sequence[str]) -> object:
        return prompt_rows(list(prompts), self.tokenizer, self.kind, self.recipe)


def load_run(run_dir: str | Path, stage: int | None = None) -> LocalStage:
    """Stage `stage` (1-based; default the last finished) of a run, on this process's accelerator device.

    The whole model must fit that device; a model that needs sharding is evaluated with `cl-scale generate`
    under the DeepSpeed launcher instead.
    """
    run, recipe = open_run_recipe(run_dir)
    index = resolve_stage(run, stage)
    state = build_state(recipe, None, len(run.tasks))
    restore_stage(state, recipe, run.stage_dir(index), index)
    return LocalStage(recipe, run.tasks[: index + 1], state.tokenizer, state.kind, on_device(state.model))


def on_device(model: ContinualModel) -> ContinualModel:
    """`model` frozen, in eval mode, on the device `TaskRows.batch` puts inputs on."""
    return model.requires_grad_(False).to(accelerator_device()).eval()
