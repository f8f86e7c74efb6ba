"""What a 2-rank, 2-stage run writes into a log file (no terminal): timestamped progress lines from rank 0
only, every train.log_every steps and at the end of each stage, with every loss term, lr, grad norm,
tokens/s and both ETAs; no warning twice; and a stale torch extension build lock left by an interrupted
launch does not stop it (DeepSpeed's CPU shared-memory op is never built)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.trainer_helpers import launch, train_log, write_recipe

TASKS = ["reverse", "sort"]
EXAMPLES, GLOBAL_BATCH, EPOCHS, LOG_EVERY = 32, 8, 2, 3
STEP_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  stage (\d)/2 (\w+) step  (\d+)/(\d+)  (.*)$")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    root = tmp_path_factory.mktemp("logs")
    recipe = write_recipe(
        root / "r.yaml", tiny_llama_dir,
        data={"root": "builtin:synthetic", "tasks": TASKS, "max_train_examples": EXAMPLES, "max_eval_examples": 4},
        train={"epochs": EPOCHS, "per_device_batch": 4, "global_batch": GLOBAL_BATCH, "lr": 5e-3,
               "collective_timeout_s": 120, "log_every": LOG_EVERY, "log_interval_s": 3600},
        eval={"max_new_tokens": 4, "batch_size": 4, "stages": "final"},
    )
    extensions = root / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"  # what a launch stopped during the op's build leaves
    lock.parent.mkdir(parents=True)
    lock.touch()
    run = root / "run"
    result = launch([(recipe, run)], ranks=2, cache=root / "cache", timeout=300, TORCH_EXTENSIONS_DIR=str(extensions))
    return result, run, extensions


def _lines(result: subprocess.CompletedProcess) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


def test_progress_lines_every_log_every_steps_and_at_the_end_from_rank_zero_only(launched) -> None:
    result, _, _ = launched
    steps = EXAMPLES // GLOBAL_BATCH * EPOCHS
    expected = sorted({*range(LOG_EVERY, steps + 1, LOG_EVERY), steps})
    matches = [m for m in map(STEP_LINE.match, _lines(result)) if m]
    for stage, task in enumerate(TASKS, start=1):
        mine = [m for m in matches if int(m.group(1)) == stage]
        assert {m.group(2) for m in mine} == {task}
        assert [int(m.group(3)) for m in mine] == expected  # once each: rank 1 prints nothing
        assert {int(m.group(4)) for m in mine} == {steps}


def test_progress_line_names_every_loss_term_lr_grad_norm_throughput_and_etas(launched) -> None:
    result, run, _ = launched
    record = train_log(run, "01-reverse")[LOG_EVERY - 1]
    line = next(m.group(5) for m in map(STEP_LINE.match, _lines(result)) if m and m.group(3) == str(LOG_EVERY))
    terms = [k for k in record if k.startswith("loss")]
    assert len(terms) >= 2
    for key in terms:
        assert f"{key} {record[key]:.4g}" in line
    assert f"lr {record['lr']:.4g}" in line and f"grad_norm {record['grad_norm']:.4g}" in line
    assert re.search(r"tokens/s \d+  run eta \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$", line), line


def test_evaluation_and_data_passes_report_done_of_total(launched) -> None:
    lines = _lines(launched[0])
    assert sum("stage 2/2 sort eval cell  2/2" in line for line in lines) == 1
    assert any(re.search(r"stage 1/2 reverse data pass 1  (\d+)/\1", line) for line in lines)


def test_no_warning_is_shown_twice(launched) -> None:
    warning_lines = [line for line in _lines(launched[0]) if "Warning:" in line]
    repeated = {line: n for line, n in Counter(warning_lines).items() if n > 1}
    assert repeated == {}


def test_stale_build_lock_neither_hangs_nor_builds(launched) -> None:
    result, run, extensions = launched
    assert "built successfully" not in result.stdout + result.stderr
    assert sorted(p.relative_to(extensions).as_posix() for p in extensions.rglob("*")) == [
        "deepspeed_shm_comm", "deepspeed_shm_comm/lock",
    ]
    assert [r["step"] for r in train_log(run, "02-sort")] == list(range(1, EXAMPLES // GLOBAL_BATCH * EPOCHS + 1))
    assert not (run / "in_progress").exists()
