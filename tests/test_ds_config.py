"""The DeepSpeed config a recipe and a world size make (`cl_scale.ds_config.build_ds_config`): the batch
layout, and ZeRO-3's world-dependent "auto", DeepSpeed's linear.

What the world-of-one choice does inside a real engine is in tests/test_zero3_world_of_one.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_scale.ds_config import build_ds_config
from cl_scale.errors import CLScaleError
from cl_scale.recipe import Recipe
from tests.trainer_helpers import shipped


def recipe(tmp_path: Path, *overrides: str) -> Recipe:
    return shipped("llama7b_order1", tmp_path, *overrides)


def deepspeeds_linear(config: dict) -> bool:
    return config["zero_optimization"]["memory_efficient_linear"]


def test_a_world_of_one_runs_torchs_linear(tmp_path: Path) -> None:
    assert deepspeeds_linear(build_ds_config(recipe(tmp_path), world_size=1)) is False


def test_several_ranks_run_deepspeeds_linear(tmp_path: Path) -> None:
    assert deepspeeds_linear(build_ds_config(recipe(tmp_path), world_size=8)) is True


def test_offloaded_parameters_run_deepspeeds_linear_even_with_a_world_of_one(tmp_path: Path) -> None:
    offload = recipe(tmp_path, "deepspeed.config=ds_configs/zero3_offload.json")
    assert deepspeeds_linear(build_ds_config(offload, world_size=1)) is True


def test_offload_set_in_the_recipes_overrides_counts_too(tmp_path: Path) -> None:
    offload = recipe(tmp_path, "deepspeed.overrides={zero_optimization: {offload_param: {device: cpu}}}")
    assert deepspeeds_linear(build_ds_config(offload, world_size=1)) is True


def test_an_explicit_choice_in_the_overrides_wins(tmp_path: Path) -> None:
    explicit = recipe(tmp_path, "deepspeed.overrides={zero_optimization: {memory_efficient_linear: true}}")
    assert deepspeeds_linear(build_ds_config(explicit, world_size=1)) is True


def test_the_batch_layout_fills_the_batch_autos(tmp_path: Path) -> None:
    config = build_ds_config(recipe(tmp_path, "train.global_batch=64", "train.per_device_batch=2"), world_size=8)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (64, 2, 4)


def test_an_auto_cl_scale_cannot_fill_names_the_field(tmp_path: Path) -> None:
    unknown = recipe(tmp_path, "deepspeed.overrides={zero_optimization: {stage3_prefetch_bucket_size: auto}}")
    with pytest.raises(CLScaleError, match="zero_optimization.stage3_prefetch_bucket_size"):
        build_ds_config(unknown, world_size=1)
