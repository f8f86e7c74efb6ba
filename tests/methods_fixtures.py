"""Builders shared by the method tests: recipe method sections, tiny continual Llamas, task data, a TaskRunner."""

from __future__ import annotations

from typing import Any

import torch

from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config
from cl_scale.distributed import LocalAccess
from cl_scale.methods import build_method, method_class
from cl_scale.methods.base import Method
from cl_scale.modeling.wrapper import IGNORE_INDEX, ContinualModel
from cl_scale.recipe import MethodConfig
from cl_scale.stage_runner import StageRunner

VOCAB = 320
TOKENS_PER_TASK = 100
"""Task k draws its tokens from its own id range, so tasks have different inputs."""

Batch = dict[str, torch.Tensor]


def method_config(name: str, **overrides: Any) -> MethodConfig:
    """The recipe's method section for `name` with small ranks; nested keys as dicts (gate={"hidden": 8})."""
    values: dict[str, Any] = {"name": name, "rank": 4, "alpha": 8.0, "gate": {"hidden": 16}}
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    return MethodConfig.model_validate(values)


def tiny_model(config: MethodConfig, *, targets: list[str] | None = None, seed: int = 0) -> ContinualModel:
    """A tiny Llama (hidden 64) with `config`'s branches, and a gate bank for GainLoRA."""
    return ContinualModel(
        build_tiny_model(tiny_llama_config(VOCAB), seed=seed),
        kind="causal",
        target_modules=targets,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        gate_hidden=config.gate.hidden if method_class(config.name).gated else None,
    )


def built(
    name: str, *, num_tasks: int = 3, targets: list[str] | None = None, **overrides: Any
) -> tuple[ContinualModel, Method]:
    """A tiny model and the method `name` on it."""
    config = method_config(name, **overrides)
    model = tiny_model(config, targets=targets)
    return model, build_method(config, model, num_tasks)


def task_batches(
    task: int, *, samples: int = 16, batch_size: int = 8, prompt: tuple[int, int] = (4, 9), answer: int = 3
) -> list[Batch]:
    """Left-padded decoder-only batches of task `task`: prompts of varied length, loss on the answer only."""
    generator = torch.Generator().manual_seed(1000 + task)
    low = 3 + TOKENS_PER_TASK * task
    sequences = []
    for _ in range(samples):
        length = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=generator))
        tokens = torch.randint(low, low + TOKENS_PER_TASK, (length + answer,), generator=generator)
        sequences.append((tokens, length))
    return [_batch(sequences[start : start + batch_size]) for start in range(0, samples, batch_size)]


def _batch(sequences: list[tuple[torch.Tensor, int]]) -> Batch:
    width = max(len(tokens) for tokens, _ in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    prompt = torch.zeros_like(ids)
    for row, (tokens, length) in enumerate(sequences):
        start = width - len(tokens)
        ids[row, start:] = tokens
        attention[row, start:] = 1
        prompt[row, start : start + length] = 1
    labels = ids.masked_fill((attention == 0) | (prompt == 1), IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": attention, "prompt_mask": prompt, "labels": labels}


def start_task(
    method: Method,
    model: ContinualModel,
    task: int,
    *,
    batches: list[Batch] | None = None,
    num_tasks: int = 3,
    lr: float = 1e-2,
) -> tuple[StageRunner, torch.optim.Optimizer]:
    """grow, choose trainables, before_task: the task is ready to train. Returns its runner and optimizer.

    The task's data is `task_batches(task)` unless `batches` are given.
    """
    method.grow(task, torch.Generator().manual_seed(task))
    params = method.trainable_parameters(task)
    runner = StageRunner(task, num_tasks, LocalAccess(), model, task_batches(task) if batches is None else batches)
    method.before_task(runner)
    return runner, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_steps(
    method: Method, runner: StageRunner, optimizer: torch.optim.Optimizer, steps: int
) -> dict[str, torch.Tensor]:
    """`steps` optimizer steps on the runner's batches, as the trainer drives them; returns the last terms."""
    model = runner.model
    model.train()
    terms: dict[str, torch.Tensor] = {}
    for step in range(steps):
        output = model(**runner.batches[step % len(runner.batches)])
        loss, terms = method.loss(output.loss, model.context)
        optimizer.zero_grad()
        loss.backward()
        method.before_step(runner)
        optimizer.step()
        method.after_step(runner)
    model.eval()
    return terms


def learn(
    method: Method,
    model: ContinualModel,
    task: int,
    *,
    batches: list[Batch] | None = None,
    steps: int = 3,
    num_tasks: int = 3,
    lr: float = 1e-2,
) -> StageRunner:
    """A whole task: start, train `steps`, after_task."""
    runner, optimizer = start_task(method, model, task, batches=batches, num_tasks=num_tasks, lr=lr)
    train_steps(method, runner, optimizer, steps)
    method.after_task(runner)
    return runner
