"""Step time on the real model: cl-scale IncLoRA against plain transformers + PEFT LoRA, same batches.

    python bench/real_step_time.py --model "$(python -m cl_scale.real_model)"

SmolLM2-135M-Instruct (dequantised Q4_1 weights, close to but not the released model), fp32, batches of
recipes/smollm2_long4.yaml's first task collated by cl-scale's own pipeline; r 8, alpha 32, q_proj and
v_proj, no dropout, AdamW on both sides. The cases, every one run once per round:

  peft            PEFT LoRA on the transformers model, a plain training step
  inclora         cl-scale IncLoRA in its DeepSpeed ZeRO-3 engine with a world of one, stepped as the
                  trainer steps it (method loss, before_step, engine.step, after_step), with the config the
                  trainer builds for a world of one: torch's linear (`ds_config.gathers_in_place`)
  inclora_ds_linear the same with DeepSpeed's linear (`memory_efficient_linear: true`), what several ranks
                  run and what a world of one ran before
  inclora_every_module that engine with DeepSpeed's linear built without making the transformer blocks
                  leaf modules (`distributed.zero3_block_leaves`), so ZeRO-3 hooks every module
  inclora_resident the trainer's engine with every parameter persistent (a threshold above every
                  parameter's size), so ZeRO-3 never releases a block
  inclora_zero2   the same in a ZeRO-2 engine (`--set deepspeed.config=ds_configs/zero2.json`): with a world
                  of one nothing is partitioned either way, so results are the same
  inclora_local   the same IncLoRA model and method without DeepSpeed (plain AdamW): what ZeRO-3 costs
  head_loss       the 49,152-wide output layer and its fp32 cross-entropy alone, forward + backward from
                  the final hidden states: the share of a step no adapter method can avoid
  collate         cl-scale's collation of one batch (TaskRows.batch)

After the timings, one more step of each training case runs under cProfile, which counts the Python
function calls it makes (a count, not a time: the same on a loaded machine), all of them and those inside
DeepSpeed's ZeRO code, and for the ZeRO-3 engine the files most called into: where an engine's cost is
Python work per module, this is where it shows.

Loading a model under ZeRO-3 (`deepspeed.zero.Init`, `memory_efficient_linear` on by default) replaces
`torch.nn.functional.linear` for the whole process with DeepSpeed's own autograd function, which keeps
only the partition of a weight between forward and backward, and never puts torch's back; the trainer
turns it off for a world of one (`memory_efficient_linear`, see `ds_config.build_ds_config`). So every
case here sets the linear it runs with: DeepSpeed's where its config asks for it, torch's in all others
(a process that loads no model with DeepSpeed's linear has no other). Without that the reference,
PEFT, ran with DeepSpeed's linear too and the ratios hid its cost.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import cProfile
import pstats
from collections.abc import Callable
from pathlib import Path

import torch
from common import TARGETS, add_timing_arguments, header, interleaved, method_step, peft_step, print_ratios

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_long4.yaml"


RESIDENT = 10**12
"""A ZeRO-3 persistence threshold above every parameter's size: no block is ever released."""


def with_overrides(recipe, overrides: dict):
    """`recipe` with `overrides` as its DeepSpeed overrides."""
    return recipe.model_copy(update={"deepspeed": recipe.deepspeed.model_copy(update={"overrides": overrides})})


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


def engine_step(state, ds_config: dict, engines: contextlib.ExitStack, batches: list[dict], recipe, *,
                leaves: bool = True) -> Callable[[], None]:
    """A trainer-like step of `state`'s IncLoRA inside its own DeepSpeed engine (kept open by `engines`);
    `leaves=False` builds the engine without `distributed.deepspeed_engine`'s block leaves."""
    import deepspeed

    from cl_scale import distributed
    from cl_scale.continual_state import stage_generator
    from cl_scale.distributed import ZeroAccess
    from cl_scale.stage_runner import StageRunner

    state.method.grow(0, stage_generator(recipe, 0))
    optimizer = torch.optim.AdamW(state.method.trainable_parameters(0), lr=recipe.train.lr, weight_decay=0.0)
    if leaves:
        engine = engines.enter_context(distributed.deepspeed_engine(state.model, ds_config, optimizer=optimizer))
    else:
        engine, *_ = deepspeed.initialize(model=state.model, optimizer=optimizer, config=ds_config)
        engines.callback(engine.destroy)
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


def with_linear(step: Callable[[], None], linear: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """`step`, run with `linear` as torch.nn.functional.linear (see the module's docstring)."""

    def run() -> None:
        torch.nn.functional.linear = linear
        step()

    return run


def python_calls(step: Callable[[], None]) -> collections.Counter[str]:
    """Python function calls one `step` makes, by the source file (site-packages' and the standard
    library's paths shortened to the package's file) of the function called."""
    profile = cProfile.Profile()
    profile.runcall(step)
    calls: collections.Counter[str] = collections.Counter()
    for (file, _, _), entry in pstats.Stats(profile).stats.items():  # entry[1]: all calls, recursive ones too
        calls[_short(file)] += entry[1]
    return calls


def hooked_modules(model: torch.nn.Module) -> int:
    """Modules ZeRO-3 puts hooks on: all but those inside a leaf module (a leaf itself is hooked)."""
    from deepspeed.utils import z3_leaf_module

    leaves = [name for name, module in model.named_modules() if z3_leaf_module(module)]
    return sum(1 for name, _ in model.named_modules() if not any(name.startswith(f"{leaf}.") for leaf in leaves))


def _short(file: str) -> str:
    """`deepspeed/runtime/zero/linear.py` for a file in site-packages, `inspect.py` for the standard library."""
    if file == "~":  # cProfile's file name for functions written in C (isinstance, getattr, tensor methods)
        return "(built-in functions)"
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    return Path(file).name if file.startswith("/") else file


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
    torch_linear = torch.nn.functional.linear  # before any ZeRO-3 model exists
    recipe = load_recipe(RECIPE, [f"model.path={args.model}", "method.name=inclora",
                                  f"data.root={REPO.parent / 'shared' / 'CL_Benchmark'}",
                                  f"data.max_train_examples={args.batch * args.batches}",
                                  f"train.per_device_batch={args.batch}", f"train.global_batch={args.batch}"])
    task = resolve_tasks(recipe.data.order, recipe.data.tasks)[0]
    with distributed.process_group(600):
        # Plain copies first: once the ZeRO-3 integration object exists, every from_pretrained partitions.
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        zero2 = recipe.model_copy(update={"deepspeed": recipe.deepspeed.model_copy(update={"config": "ds_configs/zero2.json"})})
        ds_linear, resident = ({"zero_optimization": {"memory_efficient_linear": True}},
                               {"zero_optimization": {"stage3_param_persistence_threshold": RESIDENT}})
        configs = {"inclora_zero2": build_ds_config(zero2, 1), "inclora": build_ds_config(recipe, 1),
                   "inclora_ds_linear": build_ds_config(with_overrides(recipe, ds_linear), 1),
                   "inclora_every_module": build_ds_config(with_overrides(recipe, ds_linear), 1),
                   "inclora_resident": build_ds_config(with_overrides(recipe, resident), 1)}
        states = {name: build_state(recipe, config, num_tasks=1) for name, config in configs.items()}
        zero3_linear = torch.nn.functional.linear
        if zero3_linear is torch_linear:
            raise SystemExit("loading under ZeRO-3 no longer replaces torch.nn.functional.linear: revisit this bench")
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
        cases = {name: with_linear(step, torch_linear) for name, step in cases.items()}
        linears = {"inclora": torch_linear, "inclora_ds_linear": zero3_linear, "inclora_every_module": zero3_linear,
                   "inclora_resident": torch_linear, "inclora_zero2": torch_linear}
        with contextlib.ExitStack() as engines:
            for name, config in configs.items():
                torch.nn.functional.linear = linears[name]
                step = engine_step(states[name], config, engines, batches, recipe, leaves=name != "inclora_every_module")
                cases[name] = with_linear(step, linears[name])
            timings = interleaved(cases, repeats=args.repeats, warmup=args.warmup)
            calls = {name: python_calls(cases[name]) for name in ("peft", "inclora_local", *configs)}
    print_ratios(timings, [
        ("PEFT LoRA (reference)", "peft", "peft"),
        ("cl-scale IncLoRA / PEFT", "inclora", "peft"),
        ("IncLoRA ZeRO-3, DeepSpeed's linear / PEFT", "inclora_ds_linear", "peft"),
        ("torch's linear / DeepSpeed's linear", "inclora", "inclora_ds_linear"),
        ("IncLoRA ZeRO-3, DeepSpeed's linear, every module hooked / PEFT", "inclora_every_module", "peft"),
        ("ZeRO-3 block leaves / every module hooked", "inclora_ds_linear", "inclora_every_module"),
        ("IncLoRA ZeRO-3, every parameter persistent / PEFT", "inclora_resident", "peft"),
        ("every parameter persistent / trainer's engine", "inclora_resident", "inclora"),
        ("IncLoRA ZeRO-2 / PEFT", "inclora_zero2", "peft"),
        ("IncLoRA no DeepSpeed / PEFT", "inclora_local", "peft"),
        ("output layer + loss / PEFT", "head_loss", "peft"),
        ("collation / PEFT", "collate", "peft"),
    ])
    print(f"# modules: {sum(1 for _ in state.model.modules())}, of them hooked by ZeRO-3 with block leaves: "
          f"{hooked_modules(state.model)}")
    print(f"{'python calls in one step':28} {'all':>9} {'in deepspeed/runtime/zero':>26}")
    for name, counts in calls.items():
        zero = sum(n for file, n in counts.items() if file.startswith("deepspeed/runtime/zero/"))
        print(f"{name:28} {sum(counts.values()):>9} {zero:>26}")
    print("# the files most called into in one step of the ZeRO-3 engine (what the trainer runs):")
    for file, n in calls["inclora"].most_common(12):
        print(f"{n:>9}  {file}")


if __name__ == "__main__":
    main()
