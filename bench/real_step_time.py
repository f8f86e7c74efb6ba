"""Step time on the real model: cl-scale IncLoRA against plain transformers + PEFT LoRA, same batches.

    python bench/real_step_time.py --model "$(python -m cl_scale.real_model)"

SmolLM2-135M-Instruct (dequantised Q4_1 weights, close to but not the released model), fp32, batches of
recipes/smollm2_long4.yaml's first task collated by cl-scale's own pipeline; r 8, alpha 32, q_proj and
v_proj, no dropout, AdamW on both sides. The cases, every one run once per round:

  peft            PEFT LoRA on the transformers model, a plain training step
  inclora         cl-scale IncLoRA in its DeepSpeed ZeRO-3 engine with a world of one, stepped as the
                  trainer steps it (method loss, before_step, engine.step, after_step)
  inclora_zero2   the same in a ZeRO-2 engine (`--set deepspeed.config=ds_configs/zero2.json`): with a world
                  of one nothing is partitioned either way, so results are the same
  inclora_resident the same ZeRO-3 engine with every parameter persistent (stage3_param_persistence_threshold
                  above every parameter's size): what ZeRO-3's gather and release of each module costs
  inclora_local   the same IncLoRA model and method without DeepSpeed (plain AdamW): what ZeRO-3 costs
  head_loss       the 49,152-wide output layer and its fp32 cross-entropy alone, forward + backward from
                  the final hidden states: the share of a step no adapter method can avoid
  collate         cl-scale's collation of one batch (TaskRows.batch)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable
from pathlib import Path

import torch
from common import TARGETS, add_timing_arguments, header, interleaved, method_step, peft_step, print_ratios

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_long4.yaml"
RESIDENT = 10**12
"""A ZeRO-3 persistence threshold above every parameter's size: nothing is partitioned, so no forward or
backward gathers (with a world of one a partition is the whole parameter anyway)."""


def local_step(recipe, base: torch.nn.Module, batches: list[dict]) -> Callable[[], None]:
    """IncLoRA's step without DeepSpeed: the same model and method as in the engine, plain AdamW."""
    from cl_scale.methods import build_method
    from cl_scale.modeling.wrapper import ContinualModel

    m = recipe.method
    model = ContinualModel(base, kind="causal", target_modules=TARGETS, rank=m.rank, alpha=m.alpha, dropout=0.0,
                           gate_hidden=None)
    return method_step(model, build_method(m, model, num_tasks=1), batches, lr=recipe.train.lr)


def head_loss_step(base: torch.nn.Module, batches: list[dict]) -> Callable[[], None]:
    """Output layer + loss from fixed final hidden states (computed once, outside the timing)."""
    with torch.no_grad():
        hidden = [base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                  for b in batches]
    head = base.lm_head
    cycle = iter(range(1 << 30))

    def step() -> None:
        i = next(cycle) % len(batches)
        h = hidden[i].detach().requires_grad_(True)
        logits = head(h).float()
        labels = batches[i]["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()

    return step


def engine_step(state, ds_config: dict, engines: contextlib.ExitStack, batches: list[dict], recipe) -> Callable[[], None]:
    """A trainer-like step of `state`'s IncLoRA inside its own DeepSpeed engine (kept open by `engines`)."""
    from cl_scale import distributed
    from cl_scale.continual_state import stage_generator
    from cl_scale.distributed import ZeroAccess
    from cl_scale.stage_runner import StageRunner

    state.method.grow(0, stage_generator(recipe, 0))
    optimizer = torch.optim.AdamW(state.method.trainable_parameters(0), lr=recipe.train.lr, weight_decay=0.0)
    engine = engines.enter_context(distributed.deepspeed_engine(state.model, ds_config, optimizer=optimizer))
    runner = StageRunner(0, 1, ZeroAccess(), engine, batches)
    state.method.before_task(runner)
    engine.train()
    cycle = iter(range(1 << 30))

    def step() -> None:
        output = engine(**batches[next(cycle) % len(batches)])
        loss, _ = state.method.loss(output.loss, state.model.context)
        engine.backward(loss)
        state.method.before_step(runner)
        engine.step()
        state.method.after_step(runner)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the SmolLM2 folder (`python -m cl_scale.real_model` prints it)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="distinct batches, cycled")
    add_timing_arguments(parser, repeats=5)
    args = parser.parse_args()
    header("real model step time: cl-scale IncLoRA vs transformers + PEFT LoRA", args.threads)

    import datasets
    from transformers import AutoModelForCausalLM

    from cl_scale import distributed
    from cl_scale.continual_state import build_state
    from cl_scale.data.orders import resolve_tasks
    from cl_scale.data.pipeline import prepare_task
    from cl_scale.ds_config import build_ds_config
    from cl_scale.real_model import WEIGHTS_NOTE
    from cl_scale.recipe import load_recipe

    datasets.disable_progress_bars()
    recipe = load_recipe(RECIPE, [f"model.path={args.model}", "method.name=inclora",
                                  f"data.root={REPO.parent / 'shared' / 'CL_Benchmark'}",
                                  f"data.max_train_examples={args.batch * args.batches}",
                                  f"train.per_device_batch={args.batch}", f"train.global_batch={args.batch}"])
    task = resolve_tasks(recipe.data.order, recipe.data.tasks)[0]
    with distributed.process_group(600):
        # Plain copies first: once the ZeRO-3 integration object exists, every from_pretrained partitions.
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        zero2 = recipe.model_copy(update={"deepspeed": recipe.deepspeed.model_copy(update={"config": "ds_configs/zero2.json"})})
        resident = recipe.model_copy(update={"deepspeed": recipe.deepspeed.model_copy(update={
            "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": RESIDENT}}})})
        configs = {"inclora_zero2": build_ds_config(zero2, 1), "inclora": build_ds_config(recipe, 1),
                   "inclora_resident": build_ds_config(resident, 1)}
        states = {name: build_state(recipe, config, num_tasks=1) for name, config in configs.items()}
        state = states["inclora"]
        rows = prepare_task(recipe.data, recipe.train.seed, state.tokenizer, "causal", task, "train", prompts_only=False,
                            cache_dir=None)
        groups = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.batches)]
        batches = [rows.batch(g) for g in groups]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
        print(f"# {WEIGHTS_NOTE}")
        print(f"# task {task}, batch {args.batch}, {batches[0]['input_ids'].shape[1]} positions, {tokens:.0f} real tokens "
              f"a batch on average; r {recipe.method.rank}, alpha {recipe.method.alpha:g}, fp32, AdamW")
        cases = {
            "peft": peft_step(copy.deepcopy(base), batches, rank=recipe.method.rank, alpha=recipe.method.alpha,
                              lr=recipe.train.lr),
            "inclora_local": local_step(recipe, copy.deepcopy(base), batches),
            "head_loss": head_loss_step(base, batches),
            "collate": lambda: rows.batch(groups[0]),
        }
        with contextlib.ExitStack() as engines:
            for name, config in configs.items():
                cases[name] = engine_step(states[name], config, engines, batches, recipe)
            timings = interleaved(cases, repeats=args.repeats, warmup=args.warmup)
    print_ratios(timings, [
        ("PEFT LoRA (reference)", "peft", "peft"),
        ("cl-scale IncLoRA / PEFT", "inclora", "peft"),
        ("IncLoRA ZeRO-2 / PEFT", "inclora_zero2", "peft"),
        ("IncLoRA ZeRO-3 resident / PEFT", "inclora_resident", "peft"),
        ("IncLoRA no DeepSpeed / PEFT", "inclora_local", "peft"),
        ("output layer + loss / PEFT", "head_loss", "peft"),
        ("collation / PEFT", "collate", "peft"),
    ])


if __name__ == "__main__":
    main()
