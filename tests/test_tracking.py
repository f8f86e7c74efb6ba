"""Experiment tracking through DeepSpeed's monitors: with the CSV monitor every step number and every
stage's scores and AP land on one global step axis across stages, written once by the run (not by
each stage's engine)."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from tests.trainer_helpers import launch, train_log, write_recipe

STAGES = ["01-reverse", "02-sort"]


def read_csv(path: Path) -> list[tuple[int, float]]:
    with path.open() as handle:
        rows = list(csv.reader(handle))[1:]
    return [(int(step), float(value)) for step, value in rows]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("tracked")
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}, "csv_monitor": {"enabled": True}}
    recipe = write_recipe(root / "r.yaml", tiny_llama_dir, deepspeed={"overrides": overrides},
                          train={"epochs": 1, "per_device_batch": 4, "global_batch": 8}, eval={"stages": "all"})
    launch([(recipe, root / "run")], ranks=1, cache=root / "cache")
    return root / "run"


def test_csv_monitor_gets_every_step_loss_on_one_axis_across_stages(tracked_run: Path) -> None:
    expected = [row["loss"] for stage in STAGES for row in train_log(tracked_run, stage)]
    logged = read_csv(tracked_run / "csv_monitor" / "train_loss.csv")
    assert [s for s, _ in logged] == list(range(1, len(expected) + 1))
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-6)


def test_csv_monitor_gets_lr_grad_norm_tokens_per_s_and_every_loss_term(tracked_run: Path) -> None:
    names = {p.stem for p in (tracked_run / "csv_monitor").glob("train_*.csv")}
    terms = {f"train_{k}" for stage in STAGES for k in train_log(tracked_run, stage)[0] if k.startswith("loss")}
    assert {"train_lr", "train_grad_norm", "train_tokens_per_s", *terms} <= names


def test_csv_monitor_gets_each_stage_scores_and_ap_at_the_stage_end(tracked_run: Path) -> None:
    ends = [len(train_log(tracked_run, STAGES[0]))]
    ends.append(ends[0] + len(train_log(tracked_run, STAGES[1])))
    scores = [json.loads((tracked_run / "stages" / s / "scores.json").read_text()) for s in STAGES]
    ap = [sum(c["score"] for c in stage.values()) / len(stage) for stage in scores]
    logged = read_csv(tracked_run / "csv_monitor" / "eval_AP.csv")
    assert [s for s, _ in logged] == ends and [v for _, v in logged] == pytest.approx(ap)
    assert [s for s, _ in read_csv(tracked_run / "csv_monitor" / "eval_reverse.csv")] == ends


def test_stage_engines_get_the_config_without_monitor_sections() -> None:
    from cl_scale.tracking import MONITORS, engine_config

    config = {"train_batch_size": 8, **{name: {"enabled": True} for name in MONITORS}}
    assert engine_config(config) == {"train_batch_size": 8}


def test_file_monitors_default_to_the_run_directory(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from cl_scale.tracking import monitor_sections

    recipe = SimpleNamespace(train=SimpleNamespace(tensorboard=True))
    sections = monitor_sections(recipe, {"csv_monitor": {"enabled": True}, "wandb": {"enabled": False}}, tmp_path)
    assert sections == {
        "tensorboard": {"enabled": True, "output_path": str(tmp_path), "job_name": "tensorboard"},
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "csv_monitor"},
    }


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_is_one_run_for_the_whole_sequence(tmp_path: Path, tiny_llama_dir: Path) -> None:
    overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0},
                 "wandb": {"enabled": True, "project": "cl-scale-test"}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, deepspeed={"overrides": overrides},
                          train={"epochs": 1, "per_device_batch": 4, "global_batch": 8})
    launch([(recipe, tmp_path / "run")], ranks=1, cache=tmp_path / "cache",
           WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
