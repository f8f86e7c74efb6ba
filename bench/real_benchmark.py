"""Seven continual-learning configurations on a real model and a real task sequence (`make bench-real`).

SmolLM2-135M-Instruct (built offline by `make real-model`: dequantised Q4_1 weights, close to but not
the released model) learns recipes/smollm2_long4.yaml's four Long Sequence tasks once per configuration,
with the same data, seeds and budget for all and no per-method tuning. Every configuration is its own run
directory: a finished one is reused, an interrupted one resumed, so the comparison can run in parts
(`--methods seqlora inclora`, then the rest). Wall time is summed over the sessions of each configuration.

    python bench/real_benchmark.py --model "$(python -m cl_scale.real_model)"
    python bench/real_benchmark.py --model ... --methods seqlora gainlora_inflora \\
        --set data.tasks=[sst2,agnews] data.max_train_examples=16 data.max_eval_examples=8   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_long4.yaml"
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "seqlora": ("SeqLoRA", ["method.name=seqlora"]),
    "inclora": ("IncLoRA", ["method.name=inclora"]),
    "olora": ("O-LoRA", ["method.name=olora"]),
    "nlora": ("N-LoRA", ["method.name=nlora"]),
    "inflora": ("InfLoRA", ["method.name=inflora"]),
    "gainlora_inflora": ("GainLoRA (InfLoRA)", ["method.name=gainlora", "method.branch=inflora"]),
    "gainlora_olora": ("GainLoRA (O-LoRA)", ["method.name=gainlora", "method.branch=olora"]),
}
WALL_FILE = "bench_wall.json"


def _finished(run_dir: Path, recipe) -> bool:
    """Whether `run_dir` holds a complete run of `recipe` (a finished run of another recipe is an error)."""
    from cl_scale.errors import CLScaleError
    from cl_scale.recipe import diff_recipes, recipe_to_dict
    from cl_scale.rundir import open_run

    if not (run_dir / "manifest.json").is_file():
        return False
    run = open_run(run_dir)
    changes = diff_recipes(run.recipe_dict(), recipe_to_dict(recipe))
    if changes:
        raise CLScaleError(f"{run_dir} was trained with another recipe: {'; '.join(changes)}",
                           "use another --out, or delete that run directory")
    return len(run.finished_stages()) == len(run.tasks)


def _run_config(name: str, overrides: list[str], out: Path) -> tuple[Path, float]:
    """Train (or reuse / resume) one configuration; returns its run directory and total wall seconds."""
    from cl_scale.recipe import load_recipe
    from cl_scale.trainer import run_training

    recipe = load_recipe(RECIPE, [*overrides, *CONFIGS[name][1], f"name=smollm2-{name}", f"output.dir={out}"])
    run_dir = out / recipe.name
    wall_file = run_dir / WALL_FILE
    spent = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else 0.0
    if _finished(run_dir, recipe):
        return run_dir, spent
    start = time.perf_counter()
    try:
        run_training(recipe, resume=(run_dir / "manifest.json").is_file(), run_dir=run_dir, allow_changed_recipe=False)
    finally:
        if run_dir.is_dir():
            from cl_scale.atomic import write_json

            write_json(wall_file, {"wall_s": spent + time.perf_counter() - start})
    return run_dir, json.loads(wall_file.read_text())["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the SmolLM2 folder (`python -m cl_scale.real_model` prints it)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-real")
    parser.add_argument("--methods", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--set", nargs="*", default=[], dest="sets", help="recipe overrides for EVERY configuration")
    args = parser.parse_args()

    from cl_scale import distributed
    from cl_scale.atomic import write_json
    from cl_scale.evaluation.report import read_matrix, write_heatmaps_side_by_side
    from cl_scale.real_model import WEIGHTS_NOTE

    overrides = [f"model.path={args.model}", f"data.root={REPO.parent / 'shared' / 'CL_Benchmark'}", *args.sets]
    rows, panels = [], []
    # One process group for every configuration: DeepSpeed caches the group, so it must not be re-created.
    with distributed.process_group(timeout_s=600):
        for name in args.methods:
            run_dir, wall = _run_config(name, overrides, args.out)
            matrix = read_matrix(run_dir)
            label = CONFIGS[name][0]
            rows.append({"config": name, "label": label, "wall_s": round(wall, 1), "run_dir": str(run_dir),
                         "tasks": matrix.tasks, "matrix": matrix.matrix, **matrix.metrics.as_dict()})
            panels.append((f"{label}: AP {matrix.metrics.ap:.1f}, FT {matrix.metrics.ft:.1f}", matrix.matrix, matrix.tasks))
    write_json(args.out / "results.json", {"recipe": str(RECIPE.relative_to(REPO)), "overrides": args.sets,
                                           "model": WEIGHTS_NOTE, "runs": rows})
    write_heatmaps_side_by_side(args.out / "heatmaps.png", panels)
    print(f"model: {WEIGHTS_NOTE}")
    print(f"{'configuration':<20} {'AP':>7} {'FT':>7} {'BWT':>7} {'diag':>7} {'wall s':>8}")
    for row in rows:
        print(f"{row['label']:<20} {row['AP']:7.2f} {row['FT']:7.2f} {row['BWT']:7.2f} {row['diag']:7.2f} {row['wall_s']:8.1f}")
    print(f"results: {args.out / 'results.json'}; heat maps: {args.out / 'heatmaps.png'}")


if __name__ == "__main__":
    from cl_scale.errors import CLScaleError

    try:
        main()
    except CLScaleError as err:
        raise SystemExit(f"error: {err}") from None
