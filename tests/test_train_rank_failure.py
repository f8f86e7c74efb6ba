"""A rank that dies or hangs ends the job with an error on the others, within the collective timeout.

The two ranks are started by hand (RANK / WORLD_SIZE / MASTER_* set per process, as torchrun or srun
would), not by the deepspeed launcher, which kills the other ranks itself as soon as one exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.trainer_helpers import free_port, start_train, wait_until, write_recipe

pytestmark = pytest.mark.multirank

TIMEOUT_S = 20
MARGIN_S = 30
"""Allowed beyond the timeout for the survivor to report, tear down and exit on a busy machine."""


def _start_two_ranks(tmp_path: Path, tiny_llama_dir: Path) -> list[subprocess.Popen]:
    recipe = write_recipe(
        tmp_path / "long.yaml", tiny_llama_dir,
        train={"epochs": 200, "per_device_batch": 4, "global_batch": 16, "lr": 5e-3,
               "collective_timeout_s": TIMEOUT_S},
    )
    port = str(free_port())
    return [
        start_train(
            [str(recipe), "--run-dir", str(tmp_path / "run")], cache=tmp_path / "cache", log=tmp_path / f"rank{rank}.log",
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        )
        for rank in range(2)
    ]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_survivor_exits_with_an_error_naming_the_lost_rank(tmp_path: Path, tiny_llama_dir: Path, sig) -> None:
    survivor, victim = _start_two_ranks(tmp_path, tiny_llama_dir)
    try:
        log = tmp_path / "rank0.log"
        wait_until(lambda: "parameters:" in log.read_text() or survivor.poll() is not None, what="training to start")
        assert survivor.poll() is None, log.read_text()[-3000:]
        time.sleep(1)  # into the optimizer steps
        os.kill(victim.pid, sig)
        stopped = time.monotonic()
        code = survivor.wait(timeout=TIMEOUT_S + MARGIN_S)
        elapsed = time.monotonic() - stopped
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.kill()
            process.wait()
    output = " ".join(log.read_text().split())
    print(f"{sig.name}: survivor exited with {code} after {elapsed:.1f} s")
    assert code == 2
    assert "another rank has died or stopped responding" in output
    assert f"train.collective_timeout_s = {TIMEOUT_S} s" in output
    assert "terminate called" not in output
