"""Evaluate a (possibly ZeRO-3 partitioned) continual model on task test sets.

The test set is sharded across ranks with the same number of batches on each; every rank generates
in step (synced generation, since ZeRO-3 forwards are collective) and the predictions come back to
every rank in the original example order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from cl_scale import distributed as dist_utils
from cl_scale.data.benchmark import default_metric
from cl_scale.data.pipeline import prepare_task
from cl_scale.data.tasks import task_info
from cl_scale.evaluation.scoring import score_predictions
from cl_scale.sharding import even_shards

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cl_scale.data.pipeline import TaskRows
    from cl_scale.recipe import Recipe


@dataclass
class TaskResult:
    """Score and per-example predictions of one task."""

    task: str
    metric: str
    score: float
    rows: list[dict[str, Any]]


def metric_for(recipe: Recipe, task: str) -> str:
    """The recipe's metric for `task`: explicit per task, one for all, or the benchmark default."""
    choice = recipe.eval.metric
    if isinstance(choice, dict):
        choice = choice.get(task, "auto")
    return default_metric(task_info(recipe.data, task)) if choice == "auto" else choice


def generate_texts(
    model: nn.Module, task_rows: TaskRows, tokenizer: PreTrainedTokenizerBase, *, batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers for every row of `task_rows`, in order, on every rank.

    `model` is the DeepSpeed engine that owns the continual model, or the continual model itself on one
    device (see `distributed.no_grad_pass`).
    """
    world = dist_utils.world_size()
    shards = even_shards(len(task_rows.rows), batch_size=batch_size, world_size=world, rank=dist_utils.rank())
    mine: list[tuple[int, str]] = []
    with dist_utils.no_grad_pass(model) as continual:
        for indices in shards:
            batch = task_rows.batch(indices)
            new_tokens = continual.generate(
                batch["input_ids"], batch["attention_mask"], batch["prompt_mask"],
                max_new_tokens=max_new_tokens, synced_gpus=world > 1,
            )
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            mine.extend(zip(indices, (t.strip() for t in texts)))
    gathered: list[list[tuple[int, str]]] = dist_utils.all_gather_object(mine)  # type: ignore[assignment]
    ordered = dict(pair for part in gathered for pair in part)
    return [ordered[i] for i in range(len(task_rows.rows))]


def evaluate_task(
    model: nn.Module, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, kind: str, task: str, *,
    cache_dir: Path | None, max_examples: int | None = None,
) -> TaskResult:
    """Generate on `task`'s test split and score it (task mean of per-example scores)."""
    rows = prepare_task(
        recipe.data, recipe.train.seed, tokenizer, kind, task, "test", prompts_only=True, cache_dir=cache_dir
    )
    if max_examples is not None and max_examples < len(rows.rows):
        keep = list(range(max_examples))
        rows = type(rows)(rows.examples.select(keep), rows.rows.select(keep), rows.collate)
    predictions = generate_texts(
        model, rows, tokenizer, batch_size=recipe.eval.batch_size, max_new_tokens=recipe.eval.max_new_tokens
    )
    metric = metric_for(recipe, task)
    references = rows.examples["references"]
    score, per_example = score_predictions(predictions, references, metric)
    records = [
        {"id": ex_id, "prompt": prompt, "prediction": pred, "references": refs, "score": s}
        for ex_id, prompt, pred, refs, s in zip(
            rows.examples["id"], rows.examples["prompt"], predictions, references, per_example
        )
    ]
    return TaskResult(task, metric, score, records)
