"""Every method trains a whole 3-task sequence through the real trainer (world size 1, ZeRO-3 engine).

One launch trains all six methods, and each once more in a ZeRO-2 engine (the reference for what ZeRO-3
does to gradients: its transformer blocks are leaf modules, `distributed.zero3_block_leaves`); the tests
read what each run left behind: the manifest, stage snapshots, per-step logs and (when the package is
installed) TensorBoard events.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_scale.errors import CLScaleError
from cl_scale.modeling.loading import load_base_model
from cl_scale.recipe import load_recipe
from cl_scale.tracking import TENSORBOARD_DIR
from cl_scale.tracking import require_monitor_packages
from tests.trainer_helpers import manifest, stage_tensors, train_log, train_runs, write_recipe

TASKS = ["reverse", "sort", "first"]
STAGES = [f"{i + 1:02d}-{task}" for i, task in enumerate(TASKS)]
METHODS = {
    "seqlora": {"name": "seqlora"},
    "inclora": {"name": "inclora"},
    "olora": {"name": "olora", "olora": {"lambda_l2": 0.01}},
    "nlora": {"name": "nlora"},
    "inflora": {"name": "inflora"},
    "gainlora": {"name": "gainlora"},
}
PENALTIES = {"olora": {"olora_orth", "olora_l2"}, "nlora": {"nlora_l1"}}
"""Loss terms beside the task loss that each method logs."""


def trainable_pattern(method: str, stage: int) -> str:
    """Snapshot names that train in `stage` (0-based): the task's own branch (and gate), nothing else."""
    return {
        "seqlora": r"lora_[AB]_0$",
        "inflora": rf"lora_B_{stage}$",
        "gainlora": rf"lora_B_{stage}$|gate_(W1|W2|key)_{stage}$",
    }.get(method, rf"lora_[AB]_{stage}$")


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


ZERO2 = {"config": "ds_configs/zero2.json", "overrides": {}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """The six methods (and "NAME-zero2" twins), 3 tasks of 2 optimizer steps each, one process; GainLoRA
    also writes TensorBoard."""
    root = tmp_path_factory.mktemp("methods")
    recipes = {}
    for name, method in METHODS.items():
        for run_name, deepspeed in ((name, {}), (f"{name}-zero2", ZERO2)):
            recipes[run_name] = write_recipe(
                root / f"{run_name}.yaml", tiny_llama_dir, method={"rank": 4, "gate": {"hidden": 16}, **method},
                data={"root": "builtin:synthetic", "tasks": TASKS, "max_train_examples": 16, "max_eval_examples": 4},
                train={"epochs": 1, "per_device_batch": 4, "global_batch": 8, "lr": 5e-3,
                       "tensorboard": HAS_TENSORBOARD and run_name == "gainlora"},
                deepspeed=deepspeed,
            )
    return train_runs(root, recipes)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_finishes_three_stages(runs, method: str) -> None:
    run = runs[method]
    stages = manifest(run)["stages"]
    assert [(s["index"], s["task"], s["steps"]) for s in stages] == [(i, t, 2) for i, t in enumerate(TASKS)]
    for stage in STAGES:
        assert stage_tensors(run, stage)
    scores = (run / "stages" / STAGES[-1] / "scores.json").read_text()
    assert all(task in scores for task in TASKS)


@pytest.mark.parametrize("method", list(METHODS))
def test_zero3_trains_every_method_to_zero2s_snapshots(runs, method: str) -> None:
    """With a world of one ZeRO-2 and ZeRO-3 partition nothing, so the same training must come out: a
    gradient that ZeRO-3's per-block reduction lost or reduced twice (its blocks are leaf modules) shows
    as a different snapshot. Every stage, every tensor; and the branches did train (not a vacuous match)."""
    for index, stage in enumerate(STAGES):
        three = stage_tensors(runs[method], stage)
        two = stage_tensors(runs[f"{method}-zero2"], stage)
        assert three.keys() == two.keys()
        for name in three:
            assert (three[name] - two[name]).abs().max() < 1e-4, (stage, name)
        trained = [n for n in three if re.search(trainable_pattern(method, index), n)]
        assert trained and all(three[n].abs().sum() > 0 for n in trained), stage


def test_manifest_records_the_accelerator_and_backend_the_run_used(runs) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = manifest(runs["gainlora"])["sessions"][0]["accelerator"]
    device = get_accelerator().device_name()
    assert accelerator["device"] == device
    assert accelerator["backend"] == ("nccl" if device == "cuda" else "gloo")


@pytest.mark.parametrize("method", list(METHODS))
def test_step_log_has_every_loss_term_lr_grad_norm_and_throughput(runs, method: str) -> None:
    terms = {"task"} | PENALTIES.get(method, set())
    for index, stage in enumerate(STAGES):
        for record in train_log(runs[method], stage):
            assert {k[len("loss_"):] for k in record if k.startswith("loss_")} == terms
            assert record["loss"] == pytest.approx(sum(record[f"loss_{t}"] for t in terms), rel=1e-12)
            assert all(math.isfinite(record[f"loss_{t}"]) for t in terms)
            assert record["lr"] == pytest.approx(5e-3)
            assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
            assert record["tokens_per_s"] > 0
            if method == "olora":
                assert record["loss_olora_l2"] > 0
                assert (record["loss_olora_orth"] > 0) == (index > 0), "orthogonality to old A's only from task 2"
            if method == "nlora" and record["step"] > 1:
                assert record["loss_nlora_l1"] > 0, "B starts at 0, so the L1 of B A is positive after a step"


@pytest.mark.parametrize("method", list(METHODS))
def test_only_the_current_task_parameters_move_and_their_count_is_logged(runs, method: str, tiny_llama_dir) -> None:
    base = sum(t.numel() for t in load_file(str(tiny_llama_dir / "model.safetensors")).values())
    previous: dict[str, torch.Tensor] = {}
    for index, (stage, record) in enumerate(zip(STAGES, manifest(runs[method])["stages"], strict=True)):
        snapshot = stage_tensors(runs[method], stage)
        trainable = {n for n in snapshot if re.search(trainable_pattern(method, index), n)}
        assert trainable
        counts = record["parameters"]
        assert counts["trainable"] == sum(snapshot[n].numel() for n in trainable)
        assert counts["total"] == base + sum(t.numel() for t in snapshot.values())
        assert counts["resident_per_rank"] == [counts["total"]]
        for name, value in previous.items():
            if name not in trainable:
                assert torch.equal(snapshot[name], value), f"frozen {name} moved in stage {stage}"
        assert any(not torch.equal(snapshot[n], previous.get(n, snapshot[n] * 0)) for n in trainable)
        previous = snapshot


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="the tensorboard package is not installed (pip install tensorboard)")
def test_tensorboard_gets_the_step_log_on_one_axis_across_stages(runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["gainlora"] / TENSORBOARD_DIR))
    events.Reload()
    expected = [r["loss"] for stage in STAGES for r in train_log(runs["gainlora"], stage)]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == list(range(1, len(expected) + 1))
    assert [e.value for e in logged] == pytest.approx(expected, rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/loss_task"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval/reverse")] == [len(expected)]  # the last step of the last stage


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch, tmp_path: Path, tiny_llama_dir) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_llama_dir, train={"tensorboard": True}))
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(CLScaleError, match="pip install tensorboard"):
        require_monitor_packages(recipe, {})


def test_a_monitor_enabled_in_the_deepspeed_config_without_its_package_is_a_clear_error(
    monkeypatch, tmp_path: Path, tiny_llama_dir
) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_llama_dir))
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(CLScaleError, match="pip install wandb"):
        require_monitor_packages(recipe, {"wandb": {"enabled": True}})
    require_monitor_packages(recipe, {"wandb": {"enabled": False}})  # a disabled monitor needs nothing


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attn_implementation_reaches_transformers(tmp_path: Path, tiny_llama_dir, attention: str) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_llama_dir), [f"model.attn_implementation={attention}"])
    loaded = load_base_model(recipe.model, None, pad_token_id=3)
    assert loaded.model.config._attn_implementation == attention
