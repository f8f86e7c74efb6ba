"""On a GPU, one rank trains through DeepSpeed's CUDA accelerator and NCCL, and gives the CPU's result.

Opt-in (`make test-gpu`, marker `gpu`): CI has no GPU. Both runs are fp32 (PyTorch keeps TF32 off
for float32 matrix products by default), so they may differ only by the order of floating-point sums.
A third run checks bf16, the dtype the shipped recipes train in, on the GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.trainer_helpers import launch, manifest, stage_tensors, train_log, write_recipe

pytestmark = pytest.mark.gpu

STAGES = ["01-reverse", "02-sort"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """GainLoRA (InfLoRA branches) over two tasks: fp32 on the GPU, fp32 on the CPU, bf16 on the GPU."""
    if not torch.cuda.is_available():
        pytest.fail("no CUDA device is visible: `make test-gpu` is for a machine with a GPU")
    root = tmp_path_factory.mktemp("gpu")
    fp32 = write_recipe(root / "fp32.yaml", tiny_llama_dir)
    bf16 = write_recipe(root / "bf16.yaml", tiny_llama_dir, model={"path": str(tiny_llama_dir), "dtype": "bf16"})
    runs = {"gpu": root / "run-gpu", "cpu": root / "run-cpu", "gpu-bf16": root / "run-gpu-bf16"}
    launch([(fp32, runs["gpu"]), (bf16, runs["gpu-bf16"])], ranks=1, cache=root / "cache")
    launch([(fp32, runs["cpu"])], ranks=1, cache=root / "cache", DS_ACCELERATOR="cpu")
    return runs


def test_the_gpu_run_computed_on_cuda_with_nccl(runs) -> None:
    accelerator = manifest(runs["gpu"])["sessions"][0]["accelerator"]
    assert (accelerator["device"], accelerator["backend"]) == ("cuda", "nccl")
    assert accelerator["name"] == torch.cuda.get_device_name(0)
    assert manifest(runs["cpu"])["sessions"][0]["accelerator"]["device"] == "cpu"


def test_gpu_loss_curve_matches_the_cpu_run(runs) -> None:
    for stage in STAGES:
        gpu, cpu = train_log(runs["gpu"], stage), train_log(runs["cpu"], stage)
        assert len(gpu) == len(cpu) > 0
        for a, b in zip(gpu, cpu):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (stage, a["step"])


def test_gpu_stage_snapshots_match_the_cpu_run(runs) -> None:
    for stage in STAGES:
        gpu, cpu = stage_tensors(runs["gpu"], stage), stage_tensors(runs["cpu"], stage)
        assert gpu.keys() == cpu.keys() and gpu
        for name in gpu:
            torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-5, msg=f"{stage} {name}")


def test_gpu_generations_match_the_cpu_run(runs) -> None:
    for task in ("reverse", "sort"):
        path = Path("stages") / STAGES[-1] / "predictions" / f"{task}.jsonl"
        gpu = [json.loads(line) for line in (runs["gpu"] / path).read_text().splitlines()]
        cpu = [json.loads(line) for line in (runs["cpu"] / path).read_text().splitlines()]
        assert gpu == cpu


def test_bf16_on_the_gpu_learns_with_finite_losses(runs) -> None:
    for stage in STAGES:
        log = train_log(runs["gpu-bf16"], stage)
        assert all(math.isfinite(record["loss"]) for record in log)
        assert log[-1]["loss"] < log[0]["loss"], stage
        snapshot = stage_tensors(runs["gpu-bf16"], stage)
        assert all(torch.isfinite(value).all() for value in snapshot.values())
