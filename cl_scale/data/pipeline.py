"""From the recipe's data section and a task name to tokenised rows and the collator that batches them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from cl_scale.data.chat import tokenize_chat
from cl_scale.data.collators import (
    CausalCollator,
    Seq2SeqCollator,
    tokenize_causal,
    tokenize_causal_prompts,
    tokenize_seq2seq,
)
from cl_scale.data.tasks import DataConfig, load_task
from cl_scale.distributed import accelerator_device
from cl_scale.errors import CLScaleError


@dataclass
class TaskRows:
    """Examples of one task split, tokenised, with the collator for them."""

    examples: Dataset
    """The untokenised examples (id, prompt, references, ...), same order as `rows`."""
    rows: Dataset
    collate: CausalCollator | Seq2SeqCollator

    def loss_tokens(self, indices: list[int]) -> int:
        """How many tokens the model's loss averages over in the batch of the rows at `indices`."""
        return self.collate.loss_tokens([self._labels[i] for i in indices])

    @cached_property
    def _labels(self) -> list[list[int]]:
        return self.rows["labels"]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Collate the rows at `indices` into model inputs on the accelerator this rank uses."""
        features = self.rows.select(indices)
        batch = self.collate([{k: v for k, v in row.items() if k != "id"} for row in features])
        device = accelerator_device()
        return {name: tensor.to(device) for name, tensor in batch.items()}


def prepare_task(
    data: DataConfig,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    task: str,
    split: str,
    *,
    prompts_only: bool,
    cache_dir: Path | None,
) -> TaskRows:
    """Load `task`'s `split` and tokenise it: with answers for training, prompts only for generation.

    `seed` is the data seed (capped subsets, the built-in suite): the recipe's train.seed.
    """
    examples = load_task(data, task, split, seed=seed)
    return tokenize_examples(data, tokenizer, kind, examples, prompts_only=prompts_only, cache_dir=cache_dir)


def tokenize_examples(
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    examples: Dataset,
    *,
    prompts_only: bool,
    cache_dir: Path | None = None,
) -> TaskRows:
    """Tokenise examples (columns id, prompt, and target unless prompts_only) with the data section's limits."""
    if data.chat_template and kind == "seq2seq":
        raise CLScaleError(
            "data.chat_template is for decoder-only instruct models; this model is an encoder-decoder",
            "set data.chat_template=false",
        )
    space_in_answer = data.trailing_space == "answer"
    if space_in_answer and kind == "seq2seq":
        raise CLScaleError(
            "data.trailing_space=answer moves a decoder-only prompt's trailing space into the answer; "
            "this model is an encoder-decoder, whose answer starts a fresh decoder",
            "set data.trailing_space=prompt",
        )
    if kind == "seq2seq":
        if prompts_only and "target" not in examples.column_names:
            # The seq2seq tokeniser wants a target; an empty one is dropped with the labels it makes.
            examples = examples.add_column("target", [""] * len(examples))
        rows = tokenize_seq2seq(
            examples, tokenizer, max_source_length=data.max_source_length,
            max_target_length=data.max_target_length, cache_dir=cache_dir,
        )
        if prompts_only:
            rows = rows.remove_columns("labels")
        return TaskRows(examples, rows, Seq2SeqCollator(tokenizer.pad_token_id))
    if data.chat_template:
        rows = tokenize_chat(
            examples, tokenizer, max_source_length=data.max_source_length,
            max_target_length=data.max_target_length, prompts_only=prompts_only, cache_dir=cache_dir,
        )
    elif prompts_only:
        rows = tokenize_causal_prompts(
            examples, tokenizer, max_source_length=data.max_source_length, space_in_answer=space_in_answer,
            cache_dir=cache_dir,
        )
    else:
        rows = tokenize_causal(
            examples, tokenizer, max_source_length=data.max_source_length,
            max_target_length=data.max_target_length, space_in_answer=space_in_answer, cache_dir=cache_dir,
        )
    return TaskRows(examples, rows, CausalCollator(tokenizer.pad_token_id))
