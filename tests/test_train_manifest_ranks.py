"""Rank 0 owns the run's manifest; every other rank holds rank 0's copy, never a file read of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_scale import distributed as dist_utils
from cl_scale import trainer
from cl_scale.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_a_rank_other_than_zero_takes_the_manifest_rank_zero_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    sent = {"format": "cl-scale-run/1", "tasks": ["a", "b"], "stages": [{"index": 0, "task": "a", "steps": 7}]}
    monkeypatch.setattr(dist_utils, "is_main", lambda: False)
    monkeypatch.setattr(dist_utils, "broadcast_object", lambda obj, src=0: ("ok", sent))
    run = trainer._open_run_dir(recipe, tmp_path / "run", ["a", "b"], resume=True, allow_changed_recipe=False)
    assert run.manifest == sent
    assert not (tmp_path / "run").exists(), "only rank 0 touches the run directory"
