"""The README's "bring your own tasks" example trains end to end: a built-in task then three own tasks
from JSONL, CSV and JSON files, each scored with its own metric."""

import json
from pathlib import Path

import yaml

from tests.trainer_helpers import REPO, launch

EXAMPLE = REPO / "recipes" / "own_tasks_example.yaml"


def test_own_tasks_example_trains_every_task_and_scores_it_with_its_metric(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = yaml.safe_load(EXAMPLE.read_text())
    recipe["model"]["path"] = str(tiny_llama_dir)  # the test's tiny model instead of the built-in one
    recipe["data"].update(max_train_examples=16, max_eval_examples=4)
    recipe["train"].update(epochs=1, per_device_batch=4, global_batch=8)
    recipe["eval"].update(max_new_tokens=4, batch_size=4, stages="final")
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    launch([(path, run)], ranks=1, cache=tmp_path / "cache")
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert [s["task"] for s in stages] == ["reverse", "count", "first_two", "joined"]
    scores = json.loads((run / "stages" / "04-joined" / "scores.json").read_text())
    metrics = {task: (cell["metric"], cell["examples"]) for task, cell in scores.items()}
    assert metrics == {"reverse": ("exact", 4), "count": ("exact", 4), "first_two": ("exact", 4), "joined": ("rouge", 4)}
