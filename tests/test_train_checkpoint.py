"""Resume inside a task: a 2-rank ZeRO-3 run signalled (SIGUSR1) in the middle of task 2 finishes its step,
writes DeepSpeed's engine checkpoint, exits with the requeue code, and `--resume` goes on from that step to
the uninterrupted run's result (same step records after the resume point, same snapshots)."""

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Runs:
    root = tmp_path_factory.mktemp("checkpoint")
    cache = root / "cache"
    recipe = write_recipe(
        root / "r.yaml", tiny_llama_dir,
        method={"name": "gainlora", "rank": 4, "dropout": 0.1, "gate": {"hidden": 16}},
        data={"root": "builtin:synthetic", "tasks": TASKS, "max_train_examples": 32, "max_eval_examples": 4},
        train={"epochs": 1, "epochs_per_task": {"sort": 4}, "per_device_batch": 4, "global_batch": 8, "lr": 5e-3,
               "collective_timeout_s": 120, "checkpoint_every_steps": EVERY},
    )
    uninterrupted, resumed = root / "uninterrupted", root / "resumed"
    assert _train(recipe, uninterrupted, cache, root / "a.log").wait(timeout=600) == 0, (root / "a.log").read_text()[-3000:]
    victim = _train(recipe, resumed, cache, root / "b.log")
    try:
        wait_until(lambda: len(_live(resumed)) >= EVERY + 2 or victim.poll() is not None, what="task 2, step 7")
        assert victim.poll() is None, (root / "b.log").read_text()[-3000:]
        for rank in _ranks(victim):
            rank.send_signal(signal.SIGUSR1)
        code = victim.wait(timeout=300)
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
