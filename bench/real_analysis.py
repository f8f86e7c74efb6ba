"""Inside the seven-configuration run (`make bench-real`): why the methods rank as they do, measured.

    python bench/real_analysis.py [--runs runs/bench-real] [--json out.json]

Reads the run directories bench/real_benchmark.py wrote (no training) and prints, per configuration:

  space      after each task, how much of each layer's input space the subspace bases hold (InfLoRA and
             GainLoRA keep new tasks out of it): mean / min / max of k/d over layers, and the gate bases'
  prop31     GainLoRA's Proposition 3.1 on the real model and data. After task t (t >= 2), on the test
             inputs of every task before t: a_t (the new gate's coefficient: it starts near 0 by the key's
             design; goal below 0.05), the relative change ||g_t - g_{t-1}|| / ||g_{t-1}|| of the new
             gate's MLP output (g_t starts as a copy of g_{t-1}, which stays frozen, so this is exactly what
             task t's projected updates moved), a_t on task t's own inputs for contrast, and the largest
             change of any frozen gate parameter from the stage before
  movement   for every configuration, how far learning task t moved the model's outputs on old tasks'
             test prompts: the mean KL divergence of the next-token distribution at the end of the prompt
             (where the answer starts) from stage t-1 to stage t, over the tasks before t
  gates      GainLoRA's gate matrix after the last task: mean a_i on each task's test inputs

The model is whatever the runs used (SmolLM2-135M-Instruct from `make real-model`: dequantised Q4_1
weights, close to, not the same as, the released model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def _percentiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.double(), torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {"mean": values.mean().item(), "p50": q[0].item(), "p90": q[1].item(), "max": values.max().item()}


def space(run, count: int) -> list[dict[str, float]] | None:
    """Per stage: occupancy k/d of the layer bases (mean, min, max) and of each gate basis."""
    from safetensors.torch import load_file

    from cl_scale.methods.gainlora import GATE_BASIS_PREFIX
    from cl_scale.methods.inflora import LAYER_BASIS_PREFIX
    from cl_scale.rundir import METHOD_STATE

    def occupancy(t: torch.Tensor) -> float:
        return t.shape[1] / t.shape[0]

    rows = []
    for index in range(count):
        tensors = load_file(run.stage_dir(index) / METHOD_STATE)
        gate = {n[len(GATE_BASIS_PREFIX):]: occupancy(t) for n, t in tensors.items() if n.startswith(GATE_BASIS_PREFIX)}
        layers = torch.tensor([occupancy(t) for n, t in tensors.items() if n.startswith(LAYER_BASIS_PREFIX)])
        if not gate and not len(layers):
            return None
        row = {f"gate {name}": value for name, value in gate.items()}
        if len(layers):
            row |= {"layers mean": layers.mean().item(), "layers min": layers.min().item(), "layers max": layers.max().item()}
        rows.append(row)
    return rows


def _prompt_rows(stage, task: str, examples: int):
    """The first `examples` test prompts of `task` (the runs' own test subset), tokenised as in evaluation."""
    from cl_scale.data.pipeline import TaskRows, prepare_task

    rows = prepare_task(stage.recipe.data, stage.recipe.train.seed, stage.tokenizer, stage.kind, task, "test",
                        prompts_only=True, cache_dir=None)
    keep = list(range(min(examples, len(rows.rows))))
    return TaskRows(rows.examples.select(keep), rows.rows.select(keep), rows.collate)


def _batches(rows, batch_size: int):
    total = len(rows.rows)
    for start in range(0, total, batch_size):
        yield rows.batch(list(range(start, min(total, start + batch_size))))


@torch.no_grad()
def next_token_logprobs(stage, rows, batch_size: int) -> torch.Tensor:
    """(examples, vocab) log-probabilities of the token after each prompt (prompts are left-padded)."""
    parts = []
    for batch in _batches(rows, batch_size):
        logits = stage.model(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], logits_to_keep=1).logits[:, -1]
        parts.append(logits.float().log_softmax(-1).cpu())
    return torch.cat(parts)


@torch.no_grad()
def gate_outputs(stage, rows, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients (examples, gates), MLP outputs g_i (examples, gates, d)) on `rows`."""
    coefficients, outputs = [], []
    for batch in _batches(rows, batch_size):
        xbar = stage.model.gate_input(batch["input_ids"], batch["prompt_mask"])
        coefficients.append(stage.model.gates(xbar).float().cpu())
        outputs.append(stage.model.gates.mlp_outputs(xbar)[2].float().cpu())
    return torch.cat(coefficients), torch.cat(outputs)


def _gate_parameters(stage) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in stage.model.gates.named_parameters()}


def analyse(run_dir: Path, batch_size: int, examples: int) -> dict:
    """movement (every configuration), prop31 and gates (GainLoRA) of one run directory."""
    from cl_scale.local_stage import load_run
    from cl_scale.rundir import open_run

    run = open_run(run_dir)
    tasks, count = run.tasks, run.finished_prefix()
    result: dict = {"movement": [], "prop31": [], "space": space(run, count)}
    previous = None
    for k in range(1, count + 1):
        stage = load_run(run_dir, stage=k)
        rows = {task: _prompt_rows(stage, task, examples) for task in tasks[:k]}
        logprobs = {task: next_token_logprobs(stage, rows[task], batch_size) for task in tasks[:k]}
        gated = stage.model.gates is not None and stage.model.gates.num_gates > 0
        gates = {task: gate_outputs(stage, rows[task], batch_size) for task in tasks[:k]} if gated else None
        params = _gate_parameters(stage) if gated else None
        if previous is not None:
            old = tasks[: k - 1]
            kl = [F.kl_div(logprobs[t], previous["logprobs"][t], log_target=True, reduction="batchmean").item() for t in old]
            result["movement"].append({"stage": k, "kl by old task": dict(zip(old, kl)), "kl": sum(kl) / len(kl)})
            if gated:
                a_new = torch.cat([gates[t][0][:, k - 1] for t in old])
                g = torch.cat([gates[t][1] for t in old])
                drift = (g[:, k - 1] - g[:, k - 2]).norm() / g[:, k - 2].norm()
                frozen = max((params[n] - value).abs().max().item() for n, value in previous["params"].items())
                result["prop31"].append({
                    "stage": k, "a_t on old inputs": _percentiles(a_new), "g_t relative change": drift.item(),
                    "a_t on own inputs (mean)": gates[tasks[k - 1]][0][:, k - 1].mean().item(),
                    "frozen gates max change": frozen,
                })
        previous = {"logprobs": logprobs, "params": params}
    if gates is not None:
        result["gates"] = {task: gates[task][0].mean(0).tolist() for task in tasks}
    result["tasks"] = tasks
    return result


def _print(name: str, result: dict) -> None:
    print(f"\n== {name}")
    if result["space"]:
        print("  space (fraction of the input space the bases hold, after each task):")
        for k, row in enumerate(result["space"], 1):
            print(f"    after {k}: " + "  ".join(f"{key} {value:.3f}" for key, value in row.items()))
    print("  movement (mean KL of the next-token distribution on old tasks' prompts, stage t-1 -> t):")
    for row in result["movement"]:
        per = "  ".join(f"{t} {v:.4f}" for t, v in row["kl by old task"].items())
        print(f"    stage {row['stage']}: {row['kl']:.4f}   ({per})")
    for row in result["prop31"]:
        a = row["a_t on old inputs"]
        print(f"  prop31 stage {row['stage']}: a_t on old inputs mean {a['mean']:.4f} p50 {a['p50']:.4f} "
              f"p90 {a['p90']:.4f} max {a['max']:.4f} | g_t change {row['g_t relative change']:.4f} | "
              f"a_t own {row['a_t on own inputs (mean)']:.3f} | frozen gates max change {row['frozen gates max change']:.2e}")
    if "gates" in result:
        print("  gate matrix (rows: test inputs of; columns: mean a_i of gate i):")
        for task, values in result["gates"].items():
            print(f"    {task:<8} " + "  ".join(f"{v:.3f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-real")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--examples", type=int, default=24, help="test prompts per task (the first of the runs' own)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = {}
    for run_dir in sorted(p for p in args.runs.iterdir() if (p / "manifest.json").is_file()):
        results[run_dir.name] = analyse(run_dir, args.batch_size, args.examples)
        _print(run_dir.name, results[run_dir.name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
