"""Train several recipes in one launch (one process group): `python train_recipes.py RECIPE RUN_DIR [...]`.

Started by the multi-rank tests both as a plain process (world size 1) and with `deepspeed --num_gpus 2`,
so the two worlds run exactly the same code.
"""

import sys

from cl_scale import distributed
from cl_scale.cli import strip_local_rank
from cl_scale.recipe import load_recipe
from cl_scale.trainer import run_training


def main(argv: list[str]) -> None:
    pairs = list(zip(argv[0::2], argv[1::2]))
    recipes = [load_recipe(recipe) for recipe, _ in pairs]
    with distributed.process_group(recipes[0].train.collective_timeout_s):
        for recipe, (_, run_dir) in zip(recipes, pairs):
            run_training(recipe, resume=False, run_dir=run_dir, allow_changed_recipe=False)


if __name__ == "__main__":
    main(strip_local_rank(sys.argv[1:])[0])
