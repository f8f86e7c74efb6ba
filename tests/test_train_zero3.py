"""Two ZeRO-3 ranks through the real trainer: Proposition 3.1 in fp32 and bf16, gradient checkpointing,
clean exit on every rank, parameter counts per rank, and bounded memory growth over stages.

One `deepspeed --num_gpus 2` launch trains every recipe below in one process group, one after another.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from cl_scale.data.pipeline import prepare_task
from cl_scale.modeling.gates import gate_coefficient
from cl_scale.modeling.loading import DTYPES, load_tokenizer
from cl_scale.recipe import load_recipe
from tests.trainer_helpers import launch, manifest, stage_tensors, train_log, write_recipe

pytestmark = pytest.mark.multirank

STAGES = ["01-reverse", "02-sort"]
FOUR_TASKS = ["reverse", "sort", "first", "last"]
GATED = {"name": "gainlora", "branch": "olora", "rank": 4, "threshold": 1.0, "gate": {"hidden": 16}}
"""Gates whose bases keep every direction of task 1's data (threshold 1), so Proposition 3.1 is sharp
(O-LoRA branches: InfLoRA's input bases would fill the whole input space at threshold 1)."""
FOUR_STAGES = {
    "data": {"root": "builtin:synthetic", "tasks": FOUR_TASKS, "max_train_examples": 16, "max_eval_examples": 4},
    "train": {"epochs": 1, "global_batch": 8},
    "eval": {"stages": "all"},
}
"""GainLoRA(InfLoRA) over four short tasks, evaluated after every stage."""
RECIPES = {
    "fp32": {"method": GATED},
    "bf16": {"method": GATED, "model": {"dtype": "bf16"}},
    "four_stages": FOUR_STAGES,
    "four_stages_checkpointed": {**FOUR_STAGES, "train": {**FOUR_STAGES["train"], "gradient_checkpointing": True}},
}
RSS_GROWTH_LIMIT_MB = 100


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    """(run directory per recipe name, recipe files, the launcher's completed process)."""
    root = tmp_path_factory.mktemp("zero3")
    recipes, runs = {}, {}
    for name, sections in RECIPES.items():
        sections = {"eval": {"stages": "none"}, **sections}
        recipes[name] = write_recipe(root / f"{name}.yaml", tiny_llama_dir, **sections)
        runs[name] = root / f"run-{name}"
    result = launch([(recipes[n], runs[n]) for n in RECIPES], ranks=2, cache=root / "cache")
    return runs, recipes, result


def test_a_successful_two_rank_launch_exits_zero_on_every_rank(launched) -> None:
    _, _, result = launched  # launch() already failed the test on a non-zero launcher exit code
    output = result.stdout + result.stderr
    assert output.count("exits successfully") == 2
    assert "terminate called" not in output


def _task_one_gate_inputs(recipe_path: Path) -> torch.Tensor:
    """xbar of every task-1 training example: mean frozen input embedding over its prompt tokens."""
    recipe = load_recipe(recipe_path)
    rows = prepare_task(recipe.data, recipe.train.seed, load_tokenizer(recipe.model), "causal", "reverse", "train",
                        prompts_only=False, cache_dir=None)
    batch = rows.batch(list(range(len(rows.rows))))
    base = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=DTYPES[recipe.model.dtype])
    with torch.no_grad():
        embeddings = base.get_input_embeddings()(batch["input_ids"]).double()
    mask = batch["prompt_mask"].double().unsqueeze(-1)
    return (embeddings * mask).sum(dim=1) / mask.sum(dim=1)


def _gate_output(snapshot: dict[str, torch.Tensor], gate: int, xbar: torch.Tensor) -> torch.Tensor:
    """g_i(xbar) = SiLU(W2_i SiLU(W1_i xbar)), in float64 from the snapshot's values."""
    w1, w2 = snapshot[f"gates.gate_W1_{gate}"].double(), snapshot[f"gates.gate_W2_{gate}"].double()
    return F.silu(F.silu(xbar @ w1.T) @ w2.T)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_task_two_leaves_the_gates_on_task_one_inputs_alone(launched, dtype: str) -> None:
    """Proposition 3.1 on 2 ranks, measured from the stage snapshots (the working copies the model uses).

    Gate 2's MLP starts as a copy of gate 1, so g_2 - g_1 on task-1 inputs is exactly what task 2's
    projected updates moved. Measured (torch 2.13, deepspeed 0.19.8, CPU): relative change of g_2
    9e-4 (fp32) and 8e-4 (bf16), max a_2 0.013 (fp32) and 0.0014 (bf16), gate 1 bit-identical, while
    W1_2 moved by 0.27 (fp32) and 0.26 (bf16). With the projected values written only into the fp32
    master copy (ZeroAccess.write without the working-copy refresh) the fp32 run drifts to 0.11 with
    max a_2 0.10, and in the bf16 run the new gate stops learning altogether (W1_2 moves by 0).
    """
    runs, recipes, _ = launched
    one, two = (stage_tensors(runs[dtype], stage) for stage in STAGES)
    for name, value in one.items():
        if name.startswith("gates.") and name.endswith("_0"):
            assert torch.equal(two[name], value), f"frozen {name} changed during task 2"
    assert (two["gates.gate_W1_1"] - two["gates.gate_W1_0"]).norm() > 0.05, "the new gate did not learn"
    xbar = _task_one_gate_inputs(recipes[dtype])
    g1, g2 = _gate_output(two, 0, xbar), _gate_output(two, 1, xbar)
    assert ((g2 - g1).norm() / g1.norm()).item() < 0.01
    a2 = gate_coefficient(F.cosine_similarity(g2, two["gates.gate_key_1"].double().unsqueeze(0), dim=-1))
    assert a2.max().item() < 0.05
    a1 = gate_coefficient(F.cosine_similarity(g1, two["gates.gate_key_0"].double().unsqueeze(0), dim=-1))
    assert a1.mean().item() > 0.5, "gate 1 should select its own task"


def test_gradient_checkpointing_changes_nothing_but_memory(launched) -> None:
    """Same losses, gradient norms, snapshots and predictions with checkpointed blocks (frozen base, ZeRO-3)."""
    runs, _, _ = launched
    plain, checkpointed = runs["four_stages"], runs["four_stages_checkpointed"]
    for index, task in enumerate(FOUR_TASKS):
        stage = f"{index + 1:02d}-{task}"
        logs = train_log(plain, stage), train_log(checkpointed, stage)
        assert len(logs[0]) == len(logs[1]) > 0
        for a, b in zip(*logs):
            for key in [k for k in a if k.startswith("loss")] + ["grad_norm"]:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (stage, a["step"], key)
        a, b = stage_tensors(plain, stage), stage_tensors(checkpointed, stage)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=f"{stage} {name}")
        for path in (plain / "stages" / stage / "predictions").iterdir():
            assert path.read_text() == (checkpointed / "stages" / stage / "predictions" / path.name).read_text()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_both_precisions_train_with_finite_losses(launched, dtype: str) -> None:
    runs, _, _ = launched
    for stage in STAGES:
        log = train_log(runs[dtype], stage)
        assert log and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)


def test_parameter_counts_are_logged_per_rank(launched) -> None:
    runs, _, _ = launched
    for stage in manifest(runs["four_stages"])["stages"]:
        counts = stage["parameters"]
        assert len(counts["resident_per_rank"]) == 2
        assert counts["total"] <= sum(counts["resident_per_rank"]) < counts["total"] + 1000
        assert max(counts["resident_per_rank"]) < 0.51 * counts["total"], "the base must be partitioned"


def test_resident_memory_growth_per_stage_is_bounded(launched) -> None:
    """Four engines built and torn down in one process group. Measured: about 10-35 MB per stage."""
    runs, _, _ = launched
    stages = manifest(runs["four_stages"])["stages"]
    assert len(stages) == len(FOUR_TASKS)
    per_rank = list(zip(*(stage["rss_mb"] for stage in stages)))
    assert len(per_rank) == 2
    for rank, rss in enumerate(per_rank):
        growth = [after - before for before, after in zip(rss, rss[1:])]
        print(f"rank {rank}: RSS after each stage {rss} MB, growth {growth}")
        assert max(growth) < RSS_GROWTH_LIMIT_MB, f"rank {rank} RSS per stage: {rss}"
