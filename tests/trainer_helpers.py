"""Helpers for tests that run the real trainer: recipes on tiny models, launches with 1 or 2 ranks,
`cl-scale train` processes to interrupt, and readers for what a run directory holds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from cl_scale.distributed import DEEPSPEED_SHM_PREFIX, STRICT_ENV
from cl_scale.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "tests" / "multirank" / "train_recipes.py"
CL_SCALE = Path(sys.executable).parent / "cl-scale"


def shipped(name: str, tmp_path: Path, *overrides: str) -> Recipe:
    """A shipped recipe with its data root pointed at an empty place, so only the model is read."""
    return load_recipe(REPO / "recipes" / f"{name}.yaml", [f"data.root={tmp_path / 'absent'}", *overrides])


def write_recipe(path: Path, model_dir: Path, **sections: dict[str, Any]) -> Path:
    """A small synthetic-suite recipe on `model_dir`; `sections` update the defaults section by section."""
    recipe: dict[str, Any] = {
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "data": {"root": "builtin:synthetic", "tasks": ["reverse", "sort"], "max_train_examples": 32,
                 "max_eval_examples": 8},
        "method": {"name": "gainlora", "rank": 4, "gate": {"hidden": 16}},
        "train": {"epochs": 2, "per_device_batch": 4, "global_batch": 16, "lr": 5e-3, "collective_timeout_s": 120},
        "eval": {"max_new_tokens": 4, "batch_size": 4, "stages": "final"},
        "deepspeed": {"config": "ds_configs/zero3.json",
                      "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    path.write_text(yaml.safe_dump(recipe))
    return path


def environment(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a trainer process: its own cache, unbuffered output, one thread per rank, and
    strict collectives (a tensor off the backend's communication device fails, as it would under NCCL)."""
    return {
        **os.environ, "CL_SCALE_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
        STRICT_ENV: "1", **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    pairs: list[tuple[Path, Path]], *, ranks: int, cache: Path, timeout: float = 900, **env: str
) -> subprocess.CompletedProcess:
    """Train (recipe, run_dir) pairs in one launch: a plain process for 1 rank, the deepspeed launcher for more.

    `env` adds environment variables (DS_ACCELERATOR=cpu keeps a GPU machine's run on the CPU)."""
    args = [str(x) for pair in pairs for x in pair]
    if ranks == 1:
        command = [sys.executable, str(TRAIN_SCRIPT), *args]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        command = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(TRAIN_SCRIPT), *args]
    shm_before = shm_buffers()
    result = subprocess.run(command, cwd=REPO, env=environment(cache, **env), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"launch with {ranks} rank(s) failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    leaked = shm_buffers() - shm_before
    if leaked:
        raise AssertionError(f"the launch left DeepSpeed's shared-memory buffers in /dev/shm: {sorted(leaked)}")
    return result


def train_runs(root: Path, recipes: dict[str, Path]) -> dict[str, Path]:
    """Train the named recipes in one single-process launch (cache in root/cache); each run directory
    (root/run-NAME) by name."""
    runs = {name: root / f"run-{name}" for name in recipes}
    launch([(recipe, runs[name]) for name, recipe in recipes.items()], ranks=1, cache=root / "cache")
    return runs


def shm_buffers() -> set[str]:
    """Names of DeepSpeed's CPU all-reduce buffers in /dev/shm (each holds 69 MB of RAM until removed)."""
    return {path.name for path in Path("/dev/shm").glob(f"{DEEPSPEED_SHM_PREFIX}*")}


def train_log(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    path = run_dir / "stages" / stage / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def start_train(args: list[str], *, cache: Path, log: Path, **env: str) -> subprocess.Popen:
    """`cl-scale train ARGS` in a process group of its own (so it can be signalled whole); output into `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(CL_SCALE), "train", *args], cwd=REPO, env=environment(cache, **env),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def run_train(args: list[str], *, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`cl-scale train ARGS` to completion; the caller checks the exit code."""
    command = [str(CL_SCALE), "train", *args]
    return subprocess.run(command, cwd=REPO, env=environment(cache), capture_output=True, text=True, timeout=timeout)


def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 300) -> None:
    """Poll `condition` until it holds; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.05)


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def finished_stages(run_dir: Path) -> list[int]:
    """Indices of the stages the manifest lists ([] before the run directory exists)."""
    if not (run_dir / "manifest.json").is_file():
        return []
    return [stage["index"] for stage in manifest(run_dir)["stages"]]


def stage_tensors(run_dir: Path, stage: str, name: str = "snapshot") -> dict[str, torch.Tensor]:
    """A stage's `snapshot` (branches and gates) or `method` (bases) tensors."""
    return load_file(str(run_dir / "stages" / stage / f"{name}.safetensors"))
