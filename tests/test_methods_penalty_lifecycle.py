"""A method's layer penalty lives exactly as long as its task trains, whichever path built the stages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from methods_fixtures import built
from safetensors.torch import save_file

from cl_scale.continual_state import restore_stage, stage_generator
from cl_scale.rundir import METHOD_STATE, SNAPSHOT

PENALISED = ["olora", "nlora"]


def _penalties(model) -> set[object]:
    return {layer.penalty for layer in model.branched.values()}


@pytest.mark.parametrize("name", PENALISED)
def test_penalty_is_installed_when_a_task_begins_training_and_removed_after_it(name: str) -> None:
    model, method = built(name, targets=["q_proj"])
    method.grow(0, torch.Generator().manual_seed(0))
    assert _penalties(model) == {None}, "growing a task's branch must not install its penalty yet"
    method.trainable_parameters(0)
    assert None not in _penalties(model), "the penalty must be on every layer while the task trains"
    method.after_task(SimpleNamespace(task_index=0, num_tasks=3, access=None, data_pass=lambda: None))
    assert _penalties(model) == {None}


@pytest.mark.parametrize("name", PENALISED)
def test_restoring_finished_stages_leaves_no_penalty_on_the_layers(name: str, tmp_path: Path) -> None:
    recipe = SimpleNamespace(train=SimpleNamespace(seed=3))
    trained, trained_method = built(name, targets=["q_proj"])
    for index in range(2):
        trained_method.grow(index, stage_generator(recipe, index))
    save_file({n: p.detach().contiguous() for n, p in trained.branch_parameters().items()}, str(tmp_path / SNAPSHOT))
    save_file({k: v.contiguous() for k, v in trained_method.state_tensors().items()} or {"none": torch.zeros(1)},
              str(tmp_path / METHOD_STATE))

    model, method = built(name, targets=["q_proj"])
    state = SimpleNamespace(model=model, method=method)
    restore_stage(state, recipe, tmp_path, 1)
    restored, expected = model.branch_parameters(), trained.branch_parameters()
    assert sorted(restored) == sorted(expected) and all(torch.equal(restored[n], expected[n]) for n in expected)
    assert _penalties(model) == {None}, "a resumed run or a loaded stage kept the last finished task's penalty"
