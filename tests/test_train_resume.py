"""A run is reproducible and survives interruption: same seed, same result; `kill -9` then `--resume`
gives the uninterrupted result; Ctrl-C leaves nothing half-written.

Every run here is a real `cl-scale train` process (world size 1). The recipe uses LoRA dropout, so a
resumed stage only matches if the trainer seeds each stage itself, and its second task is long enough
(16 optimizer steps) for the test to interrupt it midway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cl_scale.rundir import IN_PROGRESS, TRAIN_LOG, open_run
from tests.trainer_helpers import (
    finished_stages,
    manifest,
    run_train,
    stage_tensors,
    start_train,
    train_log,
    wait_until,
    write_recipe,
)

TASKS = ["reverse", "sort", "first"]
STAGES = [f"{i + 1:02d}-{task}" for i, task in enumerate(TASKS)]
INERT_CHANGE = "train.collective_timeout_s=300"
"""A recipe change that cannot alter the results, for resuming with --allow-changed-recipe."""


@dataclass
class Runs:
    """Two uninterrupted runs of one recipe and one run killed during task 2, then resumed."""

    first: Path
    second: Path
    resumed: Path
    refused: subprocess.CompletedProcess
    """`--resume` with a changed recipe and no override."""
    resume: subprocess.CompletedProcess
    """`--resume --allow-changed-recipe` with the same change."""
    stage_one_before_resume: tuple[bytes, int]
    """Stage 1's snapshot bytes and mtime right after the kill."""
    live_log_after_kill: list[dict]
    """Task 2's step records as the kill left them (the stage in progress)."""


def _live_log(run: Path) -> list[dict]:
    path = run / IN_PROGRESS / STAGES[1] / TRAIN_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _stage_two_started(run: Path, log: Path) -> bool:
    """Task 2 is training and has finished two steps."""
    return finished_stages(run) == [0] and f"stage 2/{len(TASKS)}" in log.read_text() and len(_live_log(run)) >= 2


def _interrupt_during_stage_two(run: Path, log: Path, process: subprocess.Popen, sig: signal.Signals) -> int:
    """Signal the whole process group once task 2 is training; returns the exit code."""
    wait_until(lambda: _stage_two_started(run, log) or process.poll() is not None, what="task 2 to start")
    assert process.poll() is None, f"training ended before task 2 could be interrupted:\n{log.read_text()[-3000:]}"
    os.killpg(process.pid, sig)
    code = process.wait(timeout=120)
    assert finished_stages(run) == [0], "the signal arrived after task 2 had finished: lengthen task 2"
    return code


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    return write_recipe(
        tmp_path_factory.mktemp("recipe") / "resume.yaml", tiny_llama_dir,
        method={"name": "gainlora", "rank": 4, "dropout": 0.1, "gate": {"hidden": 16}},
        data={"root": "builtin:synthetic", "tasks": TASKS, "max_train_examples": 32, "max_eval_examples": 4},
        train={"epochs": 1, "epochs_per_task": {"sort": 4}, "per_device_batch": 4, "global_batch": 8, "lr": 5e-3,
               "collective_timeout_s": 120},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, recipe: Path) -> Runs:
    root = tmp_path_factory.mktemp("runs")
    cache = root / "cache"
    first, second, resumed = root / "first", root / "second", root / "resumed"
    uninterrupted = [
        start_train([str(recipe), "--run-dir", str(run)], cache=cache, log=root / f"{run.name}.log")
        for run in (first, second)
    ]
    try:
        victim = start_train([str(recipe), "--run-dir", str(resumed)], cache=cache, log=root / "victim.log")
        code = _interrupt_during_stage_two(resumed, root / "victim.log", victim, signal.SIGKILL)
        assert code == -signal.SIGKILL
        partial = resumed / "stages" / f".partial-{STAGES[1]}"
        partial.mkdir()
        (partial / "snapshot.safetensors").write_bytes(b"half a file")  # what a kill during a stage commit leaves
        snapshot = resumed / "stages" / STAGES[0] / "snapshot.safetensors"
        stage_one = (snapshot.read_bytes(), snapshot.stat().st_mtime_ns)
        live_log = _live_log(resumed)
        for process in uninterrupted:
            assert process.wait(timeout=600) == 0
    finally:
        for process in uninterrupted:
            if process.poll() is None:
                process.kill()
    args = [str(recipe), "--run-dir", str(resumed), "--resume", "--set", INERT_CHANGE]
    refused = run_train(args, cache=cache)
    resume = run_train([*args, "--allow-changed-recipe"], cache=cache)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    return Runs(first, second, resumed, refused, resume, stage_one, live_log)


def _strip_throughput(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]


def _assert_same_results(a: Path, b: Path) -> None:
    """Snapshots, method state, per-step logs (but for the wall-clock throughput) and predictions agree exactly."""
    for stage in STAGES:
        for name in ("snapshot", "method"):
            left, right = stage_tensors(a, stage, name), stage_tensors(b, stage, name)
            assert left.keys() == right.keys()
            for key in left:
                assert torch.equal(left[key], right[key]), f"{stage} {name} {key}"
        assert _strip_throughput(train_log(a, stage)) == _strip_throughput(train_log(b, stage)), stage
    final = Path("stages") / STAGES[-1]
    for path in (a / final / "predictions").iterdir():
        assert path.read_text() == (b / final / "predictions" / path.name).read_text()
    assert (a / final / "scores.json").read_text() == (b / final / "scores.json").read_text()


def test_same_seed_twice_gives_the_same_result(runs: Runs) -> None:
    _assert_same_results(runs.first, runs.second)


def test_resume_after_kill_during_task_two_equals_the_uninterrupted_run(runs: Runs) -> None:
    _assert_same_results(runs.first, runs.resumed)
    assert not any(p.name.startswith(".partial-") for p in (runs.resumed / "stages").iterdir())


def test_a_kill_keeps_every_finished_step_of_the_stage_in_training(runs: Runs) -> None:
    kept = runs.live_log_after_kill
    uninterrupted = _strip_throughput(train_log(runs.first, STAGES[1]))
    assert 2 <= len(kept) < len(uninterrupted)
    assert _strip_throughput(kept) == uninterrupted[: len(kept)]


def test_committed_stage_replaces_its_step_log_in_progress(runs: Runs) -> None:
    assert not (runs.resumed / IN_PROGRESS).exists()


def test_manifest_records_where_the_resume_went_on_from(runs: Runs) -> None:
    first, *_, last = manifest(runs.resumed)["sessions"]
    assert "resumed_from" not in first
    assert last["resumed_from"] == {"index": 1, "task": TASKS[1], "step": 0}


def test_resume_redoes_only_task_two_onward(runs: Runs) -> None:
    output = runs.resume.stdout
    assert "resuming" in output and "stage 1/3" not in output
    assert "stage 2/3" in output and "stage 3/3" in output
    snapshot = runs.resumed / "stages" / STAGES[0] / "snapshot.safetensors"
    assert (snapshot.read_bytes(), snapshot.stat().st_mtime_ns) == runs.stage_one_before_resume


def test_resume_with_a_changed_recipe_fails_and_lists_the_difference(runs: Runs) -> None:
    assert runs.refused.returncode == 2
    message = " ".join(runs.refused.stderr.split())
    assert "recipe differs" in message and "train.collective_timeout_s: 120 -> 300" in message
    assert "--allow-changed-recipe" in message


def test_allow_changed_recipe_resumes_and_records_the_change(runs: Runs) -> None:
    sessions = manifest(runs.resumed)["sessions"]
    assert len(sessions) == 2, "the refused resume must not touch the manifest"
    assert sessions[-1]["recipe_changes"] == ["train.collective_timeout_s: 120 -> 300"]


def test_ctrl_c_leaves_no_half_written_file(tmp_path: Path, recipe: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    process = start_train([str(recipe), "--run-dir", str(run)], cache=tmp_path / "cache", log=log)
    assert _interrupt_during_stage_two(run, log, process, signal.SIGINT) == 130
    assert "interrupted" in log.read_text()
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".partial-") or p.name.endswith(".tmp")]
    assert leftovers == []
    json.loads((run / "manifest.json").read_text())
    assert open_run(run).finished_stages() == [0]
