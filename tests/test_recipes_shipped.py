"""The recipes in recipes/: they load, name real configs and tasks, and carry the published settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_scale.data.tasks import SYNTHETIC_ROOT, task_info
from cl_scale.data.benchmark import find_task
from cl_scale.data.orders import resolve_tasks
from cl_scale.ds_config import batch_layout, build_ds_config, zero_stage
from cl_scale.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
PUBLISHED = [
    REPO / "recipes" / f"{model}_order{n}.yaml" for model in ("llama7b", "llama13b", "t5large") for n in (1, 2, 3, 4)
]
LLAMA = [path for path in PUBLISHED if path.name.startswith("llama")]
T5 = [path for path in PUBLISHED if path.name.startswith("t5large")]


def ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def load(path: Path) -> Recipe:
    return load_recipe(path)


def test_all_twelve_published_recipes_ship() -> None:
    assert set(PUBLISHED) <= set(SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=ids(SHIPPED))
def test_shipped_recipe_loads_and_resolves_its_tasks(path: Path) -> None:
    recipe = load(path)
    assert resolve_tasks(recipe.data.order, recipe.data.tasks)


@pytest.mark.parametrize("path", SHIPPED, ids=ids(SHIPPED))
def test_shipped_recipe_deepspeed_config_exists(path: Path) -> None:
    assert load(path).deepspeed.config_path().is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=ids(SHIPPED))
def test_every_task_of_a_shipped_recipe_exists_in_the_benchmark(path: Path) -> None:
    recipe = load(path)
    if recipe.data.root == SYNTHETIC_ROOT:
        for task in resolve_tasks(recipe.data.order, recipe.data.tasks):
            assert task_info(recipe.data, task).name == task
        return
    root = REPO / recipe.data.root
    if not root.is_dir():
        pytest.skip(f"benchmark data not present at {root} (CL_Benchmark from the O-LoRA / GainLoRA repositories)")
    for task in resolve_tasks(recipe.data.order, recipe.data.tasks):
        assert find_task(root, task).name == task


@pytest.mark.parametrize("path", PUBLISHED, ids=ids(PUBLISHED))
def test_published_recipe_uses_the_published_hyperparameters(path: Path) -> None:
    r = load(path)
    settings = {
        "method": (r.method.name, r.method.branch),
        "alpha": r.method.alpha,
        "dropout": r.method.dropout,
        "threshold": r.method.threshold,
        "gate hidden": r.method.gate.hidden,
        "global batch": r.train.global_batch,
        "lr": r.train.lr,
        "grad clip": r.train.grad_clip,
        "weight decay": r.train.weight_decay,
        "warmup": r.train.warmup_steps,
        "lengths": (r.data.max_source_length, r.data.max_target_length),
        "new tokens": r.eval.max_new_tokens,
    }
    assert settings == {
        "method": ("gainlora", "inflora"),
        "alpha": 32,
        "dropout": 0.0,
        "threshold": 0.995,
        "gate hidden": 100,
        "global batch": 32,
        "lr": 3e-4,
        "grad clip": 1.0,
        "weight decay": 0.0,
        "warmup": 0,
        "lengths": (512, 50),
        "new tokens": 50,
    }


@pytest.mark.parametrize("path", PUBLISHED, ids=ids(PUBLISHED))
def test_published_recipe_order_and_rank_follow_its_order_number(path: Path) -> None:
    recipe = load(path)
    number = int(path.stem[-1])
    expected = {1: ("superni_order1", 4), 2: ("superni_order2", 4), 3: ("long_order3", 8), 4: ("long_order4", 8)}
    assert (recipe.data.order, recipe.method.rank) == expected[number]


@pytest.mark.parametrize("path", PUBLISHED, ids=ids(PUBLISHED))
def test_published_recipe_names_its_model(path: Path) -> None:
    models = {
        "llama7b": "meta-llama/Llama-2-7b-hf",
        "llama13b": "meta-llama/Llama-2-13b-hf",
        "t5large": "google-t5/t5-large",
    }
    assert load(path).model.path == models[path.stem.split("_")[0]]


@pytest.mark.parametrize("path", LLAMA, ids=ids(LLAMA))
def test_llama_recipe_is_causal_bf16_padded_with_id_1_on_zero3(path: Path) -> None:
    recipe = load(path)
    stage = zero_stage(build_ds_config(recipe, world_size=8))
    assert (recipe.model.kind, recipe.model.dtype, recipe.model.pad_token_id, stage) == ("causal", "bf16", 1, 3)


@pytest.mark.parametrize("path", T5, ids=ids(T5))
def test_t5_recipe_is_seq2seq_on_zero2(path: Path) -> None:
    recipe = load(path)
    assert (recipe.model.kind, zero_stage(build_ds_config(recipe, world_size=1))) == ("seq2seq", 2)


@pytest.mark.parametrize("path", PUBLISHED, ids=ids(PUBLISHED))
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_published_recipe_batch_divides_on_one_to_eight_gpus(path: Path, gpus: int) -> None:
    train = load(path).train
    assert batch_layout(train.global_batch, train.per_device_batch, gpus) >= 1  # raises when it does not divide


@pytest.mark.parametrize("path", PUBLISHED, ids=ids(PUBLISHED))
def test_published_recipe_comment_says_how_to_switch_method_and_launch(path: Path) -> None:
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    for needed in (
        "--set method.name=olora",
        "--set method.branch=olora",
        f"cl-scale train recipes/{path.name}",
        f"deepspeed --num_gpus 8 $(which cl-scale) train recipes/{path.name}",
        "slurm/train.sbatch",
        "CL_Benchmark",
    ):
        assert needed in header, needed
