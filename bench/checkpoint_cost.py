"""What a checkpoint inside a task costs against an optimizer step (train.checkpoint_every_steps).

Builds stage 1 of a recipe the way the trainer does (its model, method branch, AdamW and ZeRO engine),
then alternates, round by round, N training steps and one `cl_scale.checkpoint.save` into a temporary
folder, and prints the median seconds of each and their ratio: the overhead of checkpointing every k
steps is save / (k x step). Runs on 1 rank as a plain process or on more under the deepspeed launcher:

    .venv/bin/python bench/checkpoint_cost.py recipes/demo.yaml --rounds 5 --steps 4
    deepspeed --num_gpus 2 bench/checkpoint_cost.py recipes/demo.yaml --set train.global_batch=16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_scale import checkpoint
from cl_scale import distributed as dist_utils
from cl_scale.cli import strip_local_rank


def main(argv: list[str]) -> None:
    from cl_scale.cache import cache_root
    from cl_scale.continual_state import build_state, stage_generator
    from cl_scale.data.orders import resolve_tasks
    from cl_scale.data.pipeline import prepare_task
    from cl_scale.ds_config import build_ds_config
    from cl_scale.recipe import load_recipe
    from cl_scale.sharding import training_batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (N steps, then one save)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    with dist_utils.process_group(recipe.train.collective_timeout_s):
        tasks = resolve_tasks(recipe.data.order, recipe.data.tasks)
        ds_config = build_ds_config(recipe, dist_utils.world_size())
        state = build_state(recipe, ds_config, len(tasks))
        rows = dist_utils.main_first(prepare_task, recipe.data, recipe.train.seed, state.tokenizer, state.kind,
                                     tasks[0], "train", prompts_only=False, cache_dir=cache_root() / "tokenized")
        state.method.grow(0, stage_generator(recipe, 0))
        trainable = state.method.trainable_parameters(0)
        optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        plan = training_batches(
            len(rows.rows), global_batch=recipe.train.global_batch, per_device_batch=recipe.train.per_device_batch,
            world_size=dist_utils.world_size(), rank=dist_utils.rank(), epoch=0, seed=recipe.train.seed,
        )
        with dist_utils.deepspeed_engine(state.model, ds_config, optimizer=optimizer, lr_scheduler=scheduler) as engine, \
                tempfile.TemporaryDirectory() as scratch:
            folder = Path(dist_utils.broadcast_object(scratch))  # rank 0's folder: one checkpoint for all ranks
            accumulation = engine.gradient_accumulation_steps()
            engine.train()
            dist_utils.restart_zero_trace(engine)
            micro = 0

            def step() -> None:
                nonlocal micro
                for _ in range(accumulation):
                    batch = rows.batch(plan[micro % len(plan)])
                    micro += 1
                    loss, _ = state.method.loss(engine(**batch).loss, state.model.context)
                    engine.backward(loss)
                    engine.step()

            step()  # warm-up: the first step builds ZeRO's trace
            checkpoint.save(engine, folder, 0, [], recipe)
            step_s, save_s = [], []
            for round_ in range(args.rounds):
                dist_utils.barrier()
                started = time.perf_counter()
                for _ in range(args.steps):
                    step()
                dist_utils.barrier()
                step_s.append((time.perf_counter() - started) / args.steps)
                started = time.perf_counter()
                checkpoint.save(engine, folder, round_ + 1, [{"step": i} for i in range(round_ + 1)], recipe)
                save_s.append(time.perf_counter() - started)
            if dist_utils.is_main():
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                trainable_n = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
                s, c = statistics.median(step_s), statistics.median(save_s)
                print(f"recipe {args.recipe}  world {dist_utils.world_size()}  trainable {trainable_n:,}  "
                      f"checkpoint {size / 2**20:.1f} MiB on disk")
                print(f"median over {args.rounds} rounds: step {s * 1000:.1f} ms  checkpoint {c * 1000:.1f} ms  "
                      f"checkpoint/step {c / s:.2f}")
                for every in (10, 100, 1000):
                    print(f"  checkpoint_every_steps={every}: {100 * c / (every * s):.2f}% of step time")


if __name__ == "__main__":
    main(strip_local_rank(sys.argv[1:])[0])
