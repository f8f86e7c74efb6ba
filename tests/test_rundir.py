"""The run directory's names: snapshot tensor names written and parsed by one piece of code, the finished prefix."""

from __future__ import annotations

from pathlib import Path

import torch

from cl_scale.rundir import branch_tensor_name, create_run, parse_branch_tensor_name
from methods_fixtures import built


def test_branch_tensor_name_parses_back_to_module_part_and_index() -> None:
    name = branch_tensor_name("model.layers.3.self_attn.q_proj", "B", 12)
    assert parse_branch_tensor_name(name) == ("model.layers.3.self_attn.q_proj", "B", 12)


def test_gate_tensor_names_are_not_branch_names() -> None:
    assert parse_branch_tensor_name("gates.w1_0") is None


def test_every_snapshot_branch_name_of_a_model_parses_to_its_layer_and_branch() -> None:
    model, method = built("inclora")
    for task in range(2):
        method.grow(task, torch.Generator().manual_seed(task))
    parsed = {parse_branch_tensor_name(name) for name in model.branch_parameters()}
    expected = {(path, part, index) for path in model.branched for part in "AB" for index in range(2)}
    assert parsed == expected


def test_finished_prefix_stops_at_the_first_unfinished_stage(tmp_path: Path) -> None:
    run = create_run(tmp_path / "run", "name: run\n", {"tasks": ["a", "b", "c"]})
    for index in (0, 2):
        run.commit_stage(index, lambda folder: None, {})
    assert run.finished_stages() == [0, 2]
    assert run.finished_prefix() == 1
