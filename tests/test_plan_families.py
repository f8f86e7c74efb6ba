"""`plan`'s table of today's families: each shipped recipe's model rebuilt from the table has the parameter
count its publisher states, and gets the default target modules of its family."""

from pathlib import Path

import pytest

from cl_scale.plan import load_architecture
from cl_scale.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# Parameter counts as published on the models' Hugging Face pages (safetensors metadata), embeddings included.
PUBLISHED = {
    "llama31_8b_order1": 8_030_261_248,
    "qwen25_7b_order1": 7_615_616_512,
    "mistral7b_order1": 7_248_023_552,
    "gemma2_9b_order1": 9_241_705_984,  # tied: the LM head is the embedding
    "phi3_mini_order1": 3_821_079_552,
}


@pytest.mark.parametrize("recipe", list(PUBLISHED))
def test_family_in_the_table_has_its_published_parameter_count(recipe: str) -> None:
    arch, source = load_architecture(load_recipe(RECIPES / f"{recipe}.yaml"))
    assert (source, arch.base_params) == ("cl-scale's table of public model shapes", PUBLISHED[recipe])


@pytest.mark.parametrize(("recipe", "targets"), [
    ("llama31_8b_order1", {("q_proj", 4096, 4096), ("v_proj", 4096, 1024)}),
    ("qwen25_7b_order1", {("q_proj", 3584, 3584), ("v_proj", 3584, 512)}),
    ("mistral7b_order1", {("q_proj", 4096, 4096), ("v_proj", 4096, 1024)}),
    ("gemma2_9b_order1", {("q_proj", 3584, 4096), ("v_proj", 3584, 2048)}),
    ("phi3_mini_order1", {("qkv_proj", 3072, 9216)}),
])
def test_default_targets_of_each_family(recipe: str, targets: set) -> None:
    arch, _ = load_architecture(load_recipe(RECIPES / f"{recipe}.yaml", ["model.target_modules=null"]))
    assert {(t.path.rsplit(".", 1)[-1], t.d_in, t.d_out) for t in arch.targets} == targets
