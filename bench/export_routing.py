"""Serving a gated export: exact (per-request merge by gate coefficients) vs approximate (largest gate only).

    cl-scale train recipes/demo.yaml --run-dir runs/demo-gainlora      # or: cl-scale demo
    python bench/export_routing.py runs/demo-gainlora                 # the last finished stage

Loads the stage on one device (`cl_scale.load_run`, the model `cl-scale export --format gated` writes) and
scores every learned task's test set twice in one run: with every branch scaled by its gate coefficient
(what `cl-scale generate` and `load_exported` do), and with each prompt routed to the adapter of its
largest gate at coefficient 1 (what an engine serving one plain LoRA adapter per request does). Printed:
each task's score both ways, the last-row average (the stage's AP) both ways, and how often the largest
gate is the prompt's own task.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F


def largest_gate_only(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the gate bank: coefficient 1 for each row's largest gate, 0 for the others."""
    return F.one_hot(output.argmax(dim=-1), output.shape[-1]).to(output.dtype)


def main() -> None:
    from cl_scale.data.pipeline import prepare_task
    from cl_scale.evaluation.gates import gate_coefficients
    from cl_scale.evaluation.generation import evaluate_task
    from cl_scale.local_stage import load_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", type=int, default=None, help="1-based stage (default: the last finished)")
    args = parser.parse_args()
    stage = load_run(args.run_dir, args.stage)
    recipe, model = stage.recipe, stage.model
    assert model.gates is not None, "a GainLoRA run is needed"
    exact, routed, own = {}, {}, {}
    for index, task in enumerate(stage.tasks):
        exact[task] = evaluate_task(model, recipe, stage.tokenizer, stage.kind, task, cache_dir=None).score
        rows = prepare_task(recipe.data, recipe.train.seed, stage.tokenizer, stage.kind, task, "test", prompts_only=True,
                            cache_dir=None)
        coefs = gate_coefficients(model, rows, batch_size=recipe.eval.batch_size)
        own[task] = (coefs.argmax(dim=-1) == index).float().mean().item()
        handle = model.gates.register_forward_hook(largest_gate_only)
        try:
            routed[task] = evaluate_task(model, recipe, stage.tokenizer, stage.kind, task, cache_dir=None).score
        finally:
            handle.remove()
    print(f"run {args.run_dir}, stage {stage.stage}")
    print(f"{'task':<24}{'exact':>8}{'routed':>8}{'own gate largest':>18}")
    for task in stage.tasks:
        print(f"{task:<24}{exact[task]:>8.2f}{routed[task]:>8.2f}{own[task]:>18.1%}")
    ap_exact = sum(exact.values()) / len(exact)
    ap_routed = sum(routed.values()) / len(routed)
    print(f"{'AP':<24}{ap_exact:>8.2f}{ap_routed:>8.2f}")


if __name__ == "__main__":
    main()
