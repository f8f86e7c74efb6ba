"""T5 (seq2seq) trains through the same stage loop, under ZeRO-3 and under ZeRO-2 (the T5 recipes' config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.trainer_helpers import train_runs, write_recipe

CONFIGS = {"zero3": "ds_configs/zero3.json", "zero2": "ds_configs/zero2.json"}


@pytest.fixture(scope="module")
def t5_runs(tmp_path_factory: pytest.TempPathFactory, tiny_t5_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t5")
    recipes = {
        name: write_recipe(
            root / f"{name}.yaml", tiny_t5_dir,
            model={"path": str(tiny_t5_dir), "dtype": "fp32", "kind": "auto"},
            deepspeed={"config": config, "overrides": {}},
        )
        for name, config in CONFIGS.items()
    }
    return train_runs(root, recipes)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_t5_gainlora_finishes_every_stage_with_t5_branches(t5_runs, config: str) -> None:
    run = t5_runs[config]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [stage["task"] for stage in manifest["stages"]] == ["reverse", "sort"]
    snapshot = load_file(str(run / "stages" / "02-sort" / "snapshot.safetensors"))
    cross_value = [name for name in snapshot if "EncDecAttention.v.lora_B_1" in name]
    assert cross_value, "the decoder cross-attention value projection carries a branch"
    assert any(snapshot[name].abs().sum() > 0 for name in cross_value), "and it was trained"
    scores = json.loads((run / "stages" / "02-sort" / "scores.json").read_text())
    assert set(scores) == {"reverse", "sort"}


def test_zero2_and_zero3_train_t5_to_the_same_snapshot(t5_runs) -> None:
    two = load_file(str(t5_runs["zero2"] / "stages" / "02-sort" / "snapshot.safetensors"))
    three = load_file(str(t5_runs["zero3"] / "stages" / "02-sort" / "snapshot.safetensors"))
    assert two.keys() == three.keys()
    for name in two:
        assert (two[name] - three[name]).abs().max() < 1e-4, name
