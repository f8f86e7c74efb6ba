"""A ZeRO-3 engine with a world of one runs torch's linear, not DeepSpeed's (`ds_config.gathers_in_place`).

DeepSpeed's linear exists so that autograd does not keep a gathered weight alive from forward to
backward. With a world of one there is nothing to keep alive: a gather only points the parameter at its
own partition. Checked inside a real engine on the tiny Llama, with the tests' persistence threshold 0,
so every base weight is really released after use, as on several ranks.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers.integrations import is_deepspeed_zero3_enabled

from cl_scale import distributed
from cl_scale.continual_state import build_state, stage_generator
from cl_scale.ds_config import build_ds_config
from cl_scale.recipe import load_recipe
from tests.trainer_helpers import write_recipe

TORCH_LINEAR = torch._C._nn.linear
"""torch.nn.functional.linear as torch defines it, before DeepSpeed may replace it."""
RELEASED = {"stage3_param_persistence_threshold": 0}


def one_step(tmp_path: Path, model_dir: Path, zero: dict) -> dict[str, object]:
    """Load the base under ZeRO-3 (world of one) and train one step; what became of the linear, and of a
    base weight (k_proj of the first block) while its block computed and after the step. torch's linear
    is put back afterwards (DeepSpeed's replacement outlives its engine)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "linear", TORCH_LINEAR)
        return _one_step(tmp_path, model_dir, zero)


def _one_step(tmp_path: Path, model_dir: Path, zero: dict) -> dict[str, object]:
    path = write_recipe(tmp_path / "recipe.yaml", model_dir, method={"name": "inclora", "rank": 4},
                        deepspeed={"config": "ds_configs/zero3.json", "overrides": {"zero_optimization": zero}})
    recipe = load_recipe(path, [])
    with distributed.process_group(60):
        config = build_ds_config(recipe, distributed.world_size())
        state = build_state(recipe, config, num_tasks=1)
        linear = torch.nn.functional.linear
        state.method.grow(0, stage_generator(recipe, 0))
        optimizer = torch.optim.AdamW(state.method.trainable_parameters(0), lr=1e-3)
        k_proj = state.model.base.model.layers[0].self_attn.k_proj
        seen: list[tuple[int, int]] = []
        k_proj.register_forward_hook(lambda m, i, o: seen.append((m.weight.data_ptr(), m.weight.ds_tensor.data_ptr())))
        ids = torch.randint(3, state.model.base.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
        prompt = torch.zeros_like(ids, dtype=torch.bool)
        prompt[:, :3] = True
        with distributed.deepspeed_engine(state.model, config, optimizer=optimizer) as engine:
            engine.train()
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_mask=prompt, labels=ids).loss
            engine.backward(loss)
            engine.step()
            out = {"torch_linear": linear is TORCH_LINEAR, "seen": seen, "after": k_proj.weight.ds_status}
    del state, engine, k_proj
    gc.collect()
    assert not is_deepspeed_zero3_enabled()  # the integration object went with the state: later loads are plain
    return out


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, object]:
    """One step with the trainer's world-of-one config, every base weight released after use."""
    return one_step(tmp_path_factory.mktemp("released"), tiny_llama_dir, RELEASED)


def test_a_world_of_one_keeps_torchs_linear(released) -> None:
    assert released["torch_linear"]


def test_deepspeeds_linear_when_the_recipe_asks_for_it(tmp_path, tiny_llama_dir) -> None:
    """The reference the test above is told apart from: the same load, DeepSpeed's linear asked for."""
    asked = one_step(tmp_path, tiny_llama_dir, {**RELEASED, "memory_efficient_linear": True})
    assert not asked["torch_linear"]


def test_a_gathered_weight_is_its_partitions_own_storage(released) -> None:
    """What torch's autograd keeps of a weight for the backward is then the partition, kept anyway: the
    weight computed from the partition's storage, and was released after the step (not kept whole)."""
    result = released
    assert result["seen"] and all(weight == partition != 0 for weight, partition in result["seen"])
    assert result["after"] == ZeroParamStatus.NOT_AVAILABLE
