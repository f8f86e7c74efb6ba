"""`cl-scale plan`: parameter counts by hand, memory under each ZeRO stage, data checks, launch lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cl_scale.cli import app
from cl_scale.plan import GIB, Plan, launch_command, make_plan
from cl_scale.recipe import Recipe, load_recipe
from tests.trainer_helpers import shipped

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"

# Gate of GainLoRA with hidden h = 100 on model width d: W1 (h x d) + W2 (d x h) + key (d).
GATE_7B = 100 * 4096 + 4096 * 100 + 4096  # 823,296
GATE_13B = 100 * 5120 + 5120 * 100 + 5120  # 1,029,120
GATE_T5 = 100 * 1024 + 1024 * 100 + 1024  # 205,824

# Llama-2-7B: untied embedding and LM head; per layer q, k, v, o (4096 x 4096, no GQA), gate/up/down
# (4096 x 11008) and two RMSNorms; a final RMSNorm.
BASE_7B = 2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096


def plan_of(recipe: Recipe, gpus: int = 1, nodes: int = 1) -> Plan:
    return make_plan(recipe, gpus=gpus, nodes=nodes, recipe_path="run.yaml")


def memory(plan: Plan, name: str) -> float:
    assert plan.memory is not None
    return plan.memory.item(name).bytes


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A local config directory: Llama shape with grouped-query attention (2 kv heads for 4 heads)."""
    from transformers import LlamaConfig

    out = tmp_path / "tiny-llama"
    LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=100,
    ).save_pretrained(out)
    return out


def write_task(root: Path, name: str, sizes: dict[str, int]) -> None:
    """A CL_Benchmark task folder with `sizes[split]` instances per split file."""
    folder = root / "SuperNI" / name
    folder.mkdir(parents=True)
    for split, n in sizes.items():
        instances = [{"id": f"{name}-{i}", "input": f"x{i}", "output": [f"y{i}"]} for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps({"Definition": ["d"], "Instances": instances}))


def tiny_recipe(tmp_path: Path, model: Path, root: Path, tasks: Sequence[str], *overrides: str) -> Recipe:
    path = tmp_path / "tiny.yaml"
    data = {
        "model": {"path": str(model), "dtype": "bf16"},
        "data": {"root": str(root), "tasks": list(tasks)},
        "method": {"name": "inflora", "rank": 2},
        "train": {"epochs": 3, "per_device_batch": 8, "global_batch": 32},
    }
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path, overrides)


# --- trainable and total parameters ------------------------------------------------------------


def test_t5_large_gainlora_trains_795648_parameters_per_task_at_rank_4(tmp_path: Path) -> None:
    # q and v in 24 encoder self-attentions, 24 decoder self- and 24 cross-attentions: 144 modules of
    # 1024 -> 1024; InfLoRA trains B only: 1024 x 4 each.
    expected = 144 * 1024 * 4 + GATE_T5
    assert expected == 795_648
    assert plan_of(shipped("t5large_order1", tmp_path)).tasks[0].trainable == expected


def test_t5_large_gainlora_trains_1385472_parameters_per_task_at_rank_8(tmp_path: Path) -> None:
    expected = 144 * 1024 * 8 + GATE_T5
    assert expected == 1_385_472
    assert plan_of(shipped("t5large_order3", tmp_path)).tasks[0].trainable == expected


def test_llama2_7b_gainlora_inflora_trainable_count_by_hand(tmp_path: Path) -> None:
    # 32 layers x (q_proj, v_proj), both 4096 -> 4096 (kv heads = heads); B is 4096 x r, r = 4.
    expected = 32 * 2 * 4096 * 4 + GATE_7B
    assert expected == 1_871_872
    assert plan_of(shipped("llama7b_order1", tmp_path)).tasks[0].trainable == expected


def test_llama2_13b_gainlora_inflora_trainable_count_by_hand(tmp_path: Path) -> None:
    # 40 layers x (q_proj, v_proj), both 5120 -> 5120; B is 5120 x 4.
    expected = 40 * 2 * 5120 * 4 + GATE_13B
    assert expected == 2_667_520
    assert plan_of(shipped("llama13b_order1", tmp_path)).tasks[0].trainable == expected


def test_llama2_13b_long_sequence_trains_rank_8_branches(tmp_path: Path) -> None:
    expected = 40 * 2 * 5120 * 8 + GATE_13B
    assert plan_of(shipped("llama13b_order4", tmp_path)).tasks[0].trainable == expected


def test_inflora_alone_trains_only_b_and_no_gate(tmp_path: Path) -> None:
    recipe = shipped("llama7b_order1", tmp_path, "method.name=inflora")
    assert plan_of(recipe).tasks[0].trainable == 32 * 2 * 4096 * 4


def test_olora_trains_a_and_b_and_no_gate(tmp_path: Path) -> None:
    recipe = shipped("llama7b_order1", tmp_path, "method.name=olora")
    assert plan_of(recipe).tasks[0].trainable == 32 * 2 * (4 * 4096 + 4096 * 4)


def test_gainlora_with_olora_branches_trains_a_b_and_the_gate(tmp_path: Path) -> None:
    recipe = shipped("llama7b_order1", tmp_path, "method.branch=olora")
    assert plan_of(recipe).tasks[0].trainable == 32 * 2 * (4 * 4096 + 4096 * 4) + GATE_7B


def test_llama2_7b_base_has_its_published_parameter_count(tmp_path: Path) -> None:
    branch_and_gate = 32 * 2 * (4 * 4096 + 4096 * 4) + GATE_7B  # A and B exist, even where A is frozen
    assert BASE_7B == 6_738_415_616
    assert plan_of(shipped("llama7b_order1", tmp_path)).tasks[0].total == BASE_7B + branch_and_gate


def test_t5_large_base_has_its_published_parameter_count(tmp_path: Path) -> None:
    # Tied embedding 32128 x 1024; encoder layer: q k v o, wi wo (1024 x 4096), 2 norms; decoder layer:
    # self and cross q k v o, wi wo, 3 norms; one relative-position table (32 x 16) and a final norm each.
    encoder = 24 * (4 * 1024**2 + 2 * 1024 * 4096 + 2 * 1024) + 32 * 16 + 1024
    decoder = 24 * (8 * 1024**2 + 2 * 1024 * 4096 + 3 * 1024) + 32 * 16 + 1024
    base = 32128 * 1024 + encoder + decoder
    assert base == 737_668_096
    branch_and_gate = 144 * 2 * 1024 * 4 + GATE_T5
    assert plan_of(shipped("t5large_order1", tmp_path)).tasks[0].total == base + branch_and_gate


def test_total_grows_by_one_branch_and_one_gate_per_task(tmp_path: Path) -> None:
    totals = [row.total for row in plan_of(shipped("llama7b_order1", tmp_path)).tasks]
    per_task = 32 * 2 * (4 * 4096 + 4096 * 4) + GATE_7B
    assert [b - a for a, b in zip(totals, totals[1:])] == [per_task] * 14


def test_seqlora_keeps_one_branch_for_the_whole_sequence(tmp_path: Path) -> None:
    plan = plan_of(shipped("llama7b_order1", tmp_path, "method.name=seqlora"))
    assert plan.tasks[-1].total == BASE_7B + 32 * 2 * (4 * 4096 + 4096 * 4)


def test_local_config_directory_gives_grouped_query_value_width(tmp_path: Path, tiny_model: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_model, tmp_path / "absent", ["a"])
    # Rank 2, B only: q_proj 64 -> 64, v_proj 64 -> 2 kv heads x 16 = 32, in 2 layers.
    assert plan_of(recipe).tasks[0].trainable == 2 * (64 * 2 + 32 * 2)


def test_builtin_tiny_llama_is_counted_without_building_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cl_scale.builtin.factory", reason="built-in models not in this tree")
    monkeypatch.setenv("CL_SCALE_CACHE", str(tmp_path / "cache"))
    plan = plan_of(load_recipe(RECIPES / "demo.yaml"))
    # builtin:tiny-llama is 4 layers of width 128; the demo runs GainLoRA(InfLoRA) at rank 8, gate width 64:
    # B of q_proj and v_proj in every layer, plus the gate's W1, W2 and key.
    assert plan.tasks[0].trainable == 4 * 2 * 128 * 8 + (64 * 128 + 128 * 64 + 128)
    assert not (tmp_path / "cache").exists()


def test_unknown_model_skips_counts_with_a_warning(tmp_path: Path) -> None:
    plan = plan_of(shipped("llama7b_order1", tmp_path, f"model.path={tmp_path / 'nowhere'}"))
    assert (plan.tasks[0].trainable, plan.memory) == (None, None)
    assert [c.level for c in plan.checks if c.subject == "model"] == ["warning"]


def test_target_modules_that_match_nothing_are_an_error(tmp_path: Path) -> None:
    plan = plan_of(shipped("llama7b_order1", tmp_path, "model.target_modules=[nope]"))
    assert [c.level for c in plan.checks if c.subject == "model"] == ["error"]


# --- memory ------------------------------------------------------------------------------------


def test_zero3_base_parameter_memory_scales_as_one_over_the_gpus(tmp_path: Path) -> None:
    recipe = shipped("llama7b_order1", tmp_path)
    one, eight = (memory(plan_of(recipe, gpus=g), "base model") for g in (1, 8))
    assert one == BASE_7B * 2  # bf16
    assert eight == pytest.approx(one / 8)


def test_zero3_base_parameter_memory_divides_over_gpus_of_all_nodes(tmp_path: Path) -> None:
    recipe = shipped("llama7b_order1", tmp_path, "train.per_device_batch=2")
    assert memory(plan_of(recipe, gpus=8, nodes=2), "base model") == pytest.approx(BASE_7B * 2 / 16)


def test_zero2_keeps_the_base_whole_on_every_gpu(tmp_path: Path) -> None:
    recipe = shipped("t5large_order1", tmp_path)
    assert memory(plan_of(recipe, gpus=4), "base model") == 737_668_096 * 4  # fp32, not partitioned


def test_zero2_partitions_gradients_and_optimizer_states(tmp_path: Path) -> None:
    plan = plan_of(shipped("t5large_order1", tmp_path), gpus=4)
    # fp32: 4-byte gradients, Adam m and v 8 bytes (the parameter is its own master copy), over 4 GPUs.
    assert (memory(plan, "gradients"), memory(plan, "optimizer states")) == (795_648 * 4 / 4, 795_648 * 8 / 4)


def test_mixed_precision_costs_16_bytes_per_trainable_parameter(tmp_path: Path) -> None:
    plan = plan_of(shipped("llama7b_order1", tmp_path))
    spent = sum(memory(plan, name) for name in ("trainable parameters", "gradients", "optimizer states"))
    assert spent == 16 * 1_871_872  # bf16 weight 2 + bf16 gradient 2 + fp32 master, m, v 12


def test_zero3_offload_keeps_parameters_and_optimizer_states_off_the_gpu(tmp_path: Path) -> None:
    plan = plan_of(shipped("llama7b_order1", tmp_path, "deepspeed.config=ds_configs/zero3_offload.json"), gpus=8)
    assert (memory(plan, "base model"), memory(plan, "optimizer states")) == (0.0, 0.0)


def test_zero3_gathers_a_block_into_new_memory_only_over_several_gpus(tmp_path: Path) -> None:
    """With one GPU a gather points a parameter at its own partition; over several it fills a new buffer,
    and so it does with one GPU whose parameters are offloaded."""
    recipe = shipped("llama7b_order1", tmp_path)
    offload = shipped("llama7b_order1", tmp_path, "deepspeed.config=ds_configs/zero3_offload.json")
    names = {key: {item.name for item in plan_of(r, gpus=g).memory.items}
             for key, (r, g) in {"one": (recipe, 1), "eight": (recipe, 8), "offload": (offload, 1)}.items()}
    assert "ZeRO-3 gathered layers" not in names["one"]
    assert "ZeRO-3 gathered layers" in names["eight"] and "ZeRO-3 gathered layers" in names["offload"]


def test_activations_are_34_bytes_per_token_hidden_unit_and_layer(tmp_path: Path, tiny_model: Path) -> None:
    recipe = tiny_recipe(
        tmp_path, tiny_model, tmp_path / "absent", ["a"],
        "data.max_source_length=30", "data.max_target_length=10", "train.per_device_batch=2",
    )
    # bf16, prompt + answer = 40 tokens, batch 2, width 64, 2 layers.
    assert memory(plan_of(recipe), "activations (one micro-batch)") == 34 * 40 * 2 * 64 * 2


def test_gradient_checkpointing_keeps_layer_inputs_and_one_layer(tmp_path: Path, tiny_model: Path) -> None:
    recipe = tiny_recipe(
        tmp_path, tiny_model, tmp_path / "absent", ["a"],
        "data.max_source_length=30", "data.max_target_length=10", "train.per_device_batch=2",
        "train.gradient_checkpointing=true",
    )
    kept_inputs = 2 * 40 * 2 * 64 * 2  # 2 bytes per token and unit, both layers
    recomputed = 34 * 40 * 2 * 64  # one layer in full
    assert memory(plan_of(recipe), "activations (one micro-batch)") == kept_inputs + recomputed


def test_memory_total_is_the_sum_of_its_components(tmp_path: Path) -> None:
    estimate = plan_of(shipped("llama13b_order1", tmp_path), gpus=8).memory
    assert estimate is not None
    assert estimate.total == sum(item.bytes for item in estimate.items)
    assert 5 * GIB < estimate.total < 80 * GIB  # an 8-GPU 13B run fits 80 GB cards with room to spare


# --- data and batch checks ---------------------------------------------------------------------


def test_steps_drop_the_last_incomplete_global_batch(tmp_path: Path, tiny_model: Path) -> None:
    write_task(tmp_path / "bench", "a", {"train": 70, "dev": 5, "test": 5})
    row = plan_of(tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a"])).tasks[0]
    assert (row.examples, row.epochs, row.steps) == (70, 3, 2 * 3)  # 70 // 32 = 2 steps per epoch


def test_max_train_examples_caps_the_count(tmp_path: Path, tiny_model: Path) -> None:
    write_task(tmp_path / "bench", "a", {"train": 70, "dev": 5, "test": 5})
    recipe = tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a"], "data.max_train_examples=40")
    row = plan_of(recipe).tasks[0]
    assert (row.examples, row.steps) == (40, 1 * 3)


def test_epochs_per_task_override_the_default(tmp_path: Path, tiny_model: Path) -> None:
    write_task(tmp_path / "bench", "a", {"train": 64, "dev": 5, "test": 5})
    recipe = tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a"], "train.epochs_per_task={a: 5}")
    assert plan_of(recipe).tasks[0].steps == 2 * 5


def test_missing_train_split_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    write_task(tmp_path / "bench", "a", {"dev": 5, "test": 5})
    plan = plan_of(tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a"]))
    assert [(c.level, c.subject) for c in plan.checks] == [("error", "a")]


@pytest.mark.parametrize("missing", ["dev", "test"])
def test_missing_evaluation_split_is_only_a_warning(tmp_path: Path, tiny_model: Path, missing: str) -> None:
    write_task(tmp_path / "bench", "a", {split: 64 for split in ("train", "dev", "test") if split != missing})
    plan = plan_of(tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a"]))
    assert [(c.level, c.subject) for c in plan.checks] == [("warning", "a")]


def test_unknown_task_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    write_task(tmp_path / "bench", "a", {"train": 64, "dev": 5, "test": 5})
    plan = plan_of(tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a", "b"]))
    assert [(c.level, c.subject) for c in plan.checks] == [("error", "b")]


def test_fewer_examples_than_one_global_batch_warns_of_no_step(tmp_path: Path, tiny_model: Path) -> None:
    write_task(tmp_path / "bench", "a", {"train": 20, "dev": 5, "test": 5})
    plan = plan_of(tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a"]))
    assert (plan.tasks[0].steps, [c.level for c in plan.checks]) == (0, ["warning"])


def test_absent_data_root_warns_and_skips_counts(tmp_path: Path) -> None:
    plan = plan_of(shipped("t5large_order1", tmp_path))
    assert {row.examples for row in plan.tasks} == {None}
    assert [(c.level, c.subject) for c in plan.checks] == [("warning", "data")]


def test_global_batch_that_does_not_divide_over_the_world_is_an_error(tmp_path: Path) -> None:
    plan = plan_of(shipped("llama7b_order1", tmp_path), gpus=8, nodes=2)  # 4 per GPU x 16 = 64 > 32
    assert ([c.level for c in plan.checks if c.subject == "batch"], plan.accumulation) == (["error"], None)


def test_accumulation_fills_the_global_batch(tmp_path: Path) -> None:
    assert plan_of(shipped("llama7b_order1", tmp_path), gpus=2).accumulation == 32 // (4 * 2)


# --- launch line -------------------------------------------------------------------------------


def test_one_gpu_launches_a_single_process() -> None:
    assert launch_command("recipes/x.yaml", [], gpus=1, nodes=1) == "cl-scale train recipes/x.yaml"


def test_several_gpus_launch_through_deepspeed() -> None:
    expected = "deepspeed --num_gpus 8 $(which cl-scale) train recipes/x.yaml"
    assert launch_command("recipes/x.yaml", [], gpus=8, nodes=1) == expected


def test_several_nodes_launch_through_sbatch() -> None:
    expected = "sbatch --nodes 2 slurm/train.sbatch recipes/x.yaml"
    assert launch_command("recipes/x.yaml", [], gpus=8, nodes=2) == expected


def test_launch_line_carries_the_overrides() -> None:
    line = launch_command("x.yaml", ["train.lr=1e-4", "data.template=Q: {input}"], gpus=1, nodes=1)
    assert line == "cl-scale train x.yaml --set train.lr=1e-4 --set 'data.template=Q: {input}'"


def test_plan_command_prints_the_deepspeed_launch_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["plan", "recipes/t5large_order1.yaml", "--gpus", "8"])
    assert result.exit_code == 0, result.output
    assert "deepspeed --num_gpus 8 $(which cl-scale) train recipes/t5large_order1.yaml" in result.output


def test_plan_command_fails_after_printing_when_a_train_split_is_missing(tmp_path: Path, tiny_model: Path) -> None:
    write_task(tmp_path / "bench", "a", {"dev": 5, "test": 5})
    tiny_recipe(tmp_path, tiny_model, tmp_path / "bench", ["a"])  # writes tmp_path / "tiny.yaml"
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "tiny.yaml")])
    assert result.exit_code == 2
    assert "error(s) that would stop the run (a)" in result.output


@pytest.mark.parametrize(
    "method", ["seqlora", "inclora", "olora", "nlora", "inflora", "gainlora", "gainlora:olora", "gainlora:nlora"]
)
def test_trainable_count_equals_the_built_models_trainable_parameters(method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from cl_scale.builtin.factory import spec_config
    from cl_scale.builtin.specs import BUILTINS
    from cl_scale.methods import build_method, method_class
    from cl_scale.modeling.wrapper import ContinualModel

    name, _, branch = method.partition(":")
    overrides = [f"method.name={name}", "method.rank=4", "method.gate.hidden=16", f"data.root={tmp_path}"]
    recipe = load_recipe(RECIPES / "demo.yaml", overrides + ([f"method.branch={branch}"] if branch else []))
    spec = BUILTINS["tiny-llama"]
    model = ContinualModel(
        AutoModelForCausalLM.from_config(spec_config(spec, spec.vocab_size)),
        kind="causal",
        target_modules=recipe.model.target_modules,
        rank=recipe.method.rank,
        alpha=recipe.method.alpha,
        dropout=0.0,
        gate_hidden=recipe.method.gate.hidden if method_class(name).gated else None,
    )
    real = build_method(recipe.method, model, num_tasks=3)
    generator = torch.Generator().manual_seed(0)
    for task in range(2):
        real.grow(task, generator)
    trained = sum(p.numel() for p in real.trainable_parameters(1))
    assert plan_of(recipe).tasks[1].trainable == trained
