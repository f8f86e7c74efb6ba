"""Resume inside a task: a 2-rank ZeRO-3 run signalled (SIGUSR1) in the middle of task 2 finishes its step,
writes DeepSpeed's engine checkpoint, exits with the requeue code, and `--resume` goes on from that step to
the uninterrupted run's result (same step records after the resume point, same snapshots). Signalled after
task 2's training (during its data pass or evaluation), it stops at the next boundary with the checkpoint of
the last step, and `--resume` repeats no step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from cl_scale.checkpoint import CHECKPOINT_DIR, COMPLETE
from cl_scale.errors import REQUEUE_EXIT
from cl_scale.rundir import IN_PROGRESS, TRAIN_LOG
from tests.trainer_helpers import (
    REPO,
    environment,
    free_port,
    manifest,
    stage_tensors,
    train_log,
    wait_until,
    write_recipe,
)

TASKS = ["reverse", "sort"]
STAGES = [f"{i + 1:02d}-{task}" for i, task in enumerate(TASKS)]
EVERY = 5
STEPS_TWO = 32 // 8 * 4


@dataclass
class Runs:
    uninterrupted: Path
    resumed: Path
    stop_code: int
    stop_output: str
    checkpoint_step: int
    log_at_stop: list[dict]


@dataclass
class Setup:
    root: Path
    recipe: Path
    cache: Path
    uninterrupted: Path


def _train(recipe: Path, run: Path, cache: Path, out: Path, *extra: str) -> subprocess.Popen:
    launcher = Path(sys.executable).parent / "deepspeed"
    cl_scale = Path(sys.executable).parent / "cl-scale"
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(cl_scale), "train",
               str(recipe), "--run-dir", str(run), *extra]
    with open(out, "w") as handle:
        return subprocess.Popen(command, cwd=REPO, env=environment(cache), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _live(run: Path) -> list[dict]:
    path = run / IN_PROGRESS / STAGES[1] / TRAIN_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank=" in " ".join(p.cmdline())]


def _signal(victim: subprocess.Popen) -> int:
    for rank in _ranks(victim):
        rank.send_signal(signal.SIGUSR1)
    return victim.wait(timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Setup:
    """The recipe (evaluation long enough to be signalled in: 64 test examples a task) and its uninterrupted run."""
    root = tmp_path_factory.mktemp("checkpoint")
    cache = root / "cache"
    recipe = write_recipe(
        root / "r.yaml", tiny_llama_dir,
        method={"name": "gainlora", "rank": 4, "dropout": 0.1, "gate": {"hidden": 16}},
        data={"root": "builtin:synthetic", "tasks": TASKS, "max_train_examples": 32, "max_eval_examples": 64},
        train={"epochs": 1, "epochs_per_task": {"sort": 4}, "per_device_batch": 4, "global_batch": 8, "lr": 5e-3,
               "collective_timeout_s": 120, "checkpoint_every_steps": EVERY},
    )
    uninterrupted = root / "uninterrupted"
    assert _train(recipe, uninterrupted, cache, root / "a.log").wait(timeout=600) == 0, (root / "a.log").read_text()[-3000:]
    return Setup(root, recipe, cache, uninterrupted)


@pytest.fixture(scope="module")
def runs(setup: Setup) -> Runs:
    root, recipe, cache, uninterrupted = setup.root, setup.recipe, setup.cache, setup.uninterrupted
    resumed = root / "resumed"
    victim = _train(recipe, resumed, cache, root / "b.log")
    try:
        wait_until(lambda: len(_live(resumed)) >= EVERY + 2 or victim.poll() is not None, what="task 2, step 7")
        assert victim.poll() is None, (root / "b.log").read_text()[-3000:]
        code = _signal(victim)
    finally:
        if victim.poll() is None:
            victim.kill()
    checkpoints = resumed / IN_PROGRESS / STAGES[1] / CHECKPOINT_DIR
    tags = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert len(tags) == 1
    step = json.loads((checkpoints / tags[0] / COMPLETE).read_text())["step"]
    log_at_stop = _live(resumed)
    resume = _train(recipe, resumed, cache, root / "c.log", "--resume")
    assert resume.wait(timeout=600) == 0, (root / "c.log").read_text()[-3000:]
    return Runs(uninterrupted, resumed, code, (root / "b.log").read_text(), step, log_at_stop)


def _strip(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]


def test_signal_ends_the_run_with_the_requeue_code_after_a_checkpoint_of_its_last_step(runs: Runs) -> None:
    assert runs.stop_code == REQUEUE_EXIT, runs.stop_output[-3000:]
    assert EVERY + 2 <= runs.checkpoint_step < STEPS_TWO
    assert len(runs.log_at_stop) == runs.checkpoint_step  # the step it finished, no more


def test_resumed_run_equals_the_uninterrupted_one(runs: Runs) -> None:
    for stage in STAGES:
        left, right = stage_tensors(runs.uninterrupted, stage), stage_tensors(runs.resumed, stage)
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(right[key], left[key], rtol=0, atol=1e-6, msg=f"{stage} {key}")
        assert _strip(train_log(runs.resumed, stage)) == _strip(train_log(runs.uninterrupted, stage)), stage


def test_resume_goes_on_from_the_checkpoint_and_the_manifest_says_so(runs: Runs) -> None:
    assert manifest(runs.resumed)["sessions"][-1]["resumed_from"] == {
        "index": 1, "task": TASKS[1], "step": runs.checkpoint_step,
    }
    assert not (runs.resumed / IN_PROGRESS).exists()


@dataclass
class AfterTraining:
    stop_code: int
    stop_output: str
    finished_at_stop: int
    resumed: Path
    resume_output: str


@pytest.fixture(scope="module")
def after_training(setup: Setup) -> AfterTraining:
    """Signalled once task 2's last step is checkpointed, while its data pass and evaluation run; then resumed."""
    run = setup.root / "after-training"
    final = run / IN_PROGRESS / STAGES[1] / CHECKPOINT_DIR / f"step-{STEPS_TWO:07d}" / COMPLETE
    victim = _train(setup.recipe, run, setup.cache, setup.root / "d.log")
    try:
        wait_until(lambda: final.is_file() or victim.poll() is not None, what="task 2's last step checkpointed")
        assert victim.poll() is None, (setup.root / "d.log").read_text()[-3000:]
        code = _signal(victim)
    finally:
        if victim.poll() is None:
            victim.kill()
    finished = len(manifest(run)["stages"])
    resume = _train(setup.recipe, run, setup.cache, setup.root / "e.log", "--resume")
    assert resume.wait(timeout=600) == 0, (setup.root / "e.log").read_text()[-3000:]
    return AfterTraining(code, (setup.root / "d.log").read_text(), finished, run, (setup.root / "e.log").read_text())


def test_signal_after_training_stops_at_the_next_boundary_with_the_last_step_saved(
    after_training: AfterTraining,
) -> None:
    assert after_training.stop_code == REQUEUE_EXIT, after_training.stop_output[-3000:]
    assert "stopped by a signal after training sort" in after_training.stop_output
    assert after_training.finished_at_stop == 1  # task 2 not committed half-evaluated


def test_resume_after_a_stop_after_training_repeats_no_step_and_equals_the_uninterrupted_run(
    setup: Setup, after_training: AfterTraining
) -> None:
    assert f"resuming {TASKS[1]} after step {STEPS_TWO}/{STEPS_TWO}" in after_training.resume_output
    assert manifest(after_training.resumed)["sessions"][-1]["resumed_from"]["step"] == STEPS_TWO
    for stage in STAGES:
        left, right = stage_tensors(setup.uninterrupted, stage), stage_tensors(after_training.resumed, stage)
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(right[key], left[key], rtol=0, atol=1e-6, msg=f"{stage} {key}")
        assert _strip(train_log(after_training.resumed, stage)) == _strip(train_log(setup.uninterrupted, stage))
    stage_two = after_training.resumed / "stages" / STAGES[1] / "predictions"
    for path in (setup.uninterrupted / "stages" / STAGES[1] / "predictions").iterdir():
        assert (stage_two / path.name).read_text() == path.read_text()
