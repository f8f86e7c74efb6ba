"""A step's loss is the mean over every loss token of its global batch, however the batch is split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from modeling_fixtures import causal_config, continual, random_tokens, untied_t5_config

from cl_scale.builtin.tiny import build_tiny_model
from cl_scale.data.collators import CausalCollator, Seq2SeqCollator
from cl_scale.data.pipeline import TaskRows
from cl_scale.errors import CLScaleError
from cl_scale.sharding import step_micro_batches, training_batches
from cl_scale.trainer import token_weights

IGNORE = -100


def _causal_rows(prompt_lengths: list[int], answer_lengths: list[int]) -> list[dict[str, list[int]]]:
    rows = []
    for i, (p, a) in enumerate(zip(prompt_lengths, answer_lengths, strict=True)):
        ids = random_tokens(p + a, seed=i)
        rows.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:], "prompt_mask": [1] * p + [0] * a})
    return rows


def _task_rows(rows: list[dict[str, list[int]]], collate: CausalCollator | Seq2SeqCollator) -> TaskRows:
    return TaskRows(Dataset.from_dict({"id": [str(i) for i in range(len(rows))]}),
                    Dataset.from_list(rows), collate)


def test_causal_loss_tokens_are_what_the_models_mean_loss_divides_by() -> None:
    # the longest row has no prompt: its first labelled token sits in column 0, which the shift leaves out
    rows = _causal_rows([0, 4, 2], [6, 1, 3])
    collate = CausalCollator(pad_id=0)
    batch = collate(rows)
    model = continual(build_tiny_model(causal_config("llama"), seed=0), "causal", gate_hidden=None)
    output = model(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], labels=batch["labels"])
    summed = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                             ignore_index=IGNORE, reduction="sum")
    count = collate.loss_tokens([row["labels"] for row in rows])
    torch.testing.assert_close(output.loss * count, summed)
    assert count == 6 + 1 + 3 - 1, "column 0 is not a loss position"


def test_seq2seq_loss_tokens_are_every_labelled_target_token() -> None:
    sources, targets = [random_tokens(5, seed=1), random_tokens(3, seed=2)], [random_tokens(4, seed=3), random_tokens(1, seed=4)]
    rows = [{"input_ids": s, "labels": t} for s, t in zip(sources, targets, strict=True)]
    collate = Seq2SeqCollator(pad_id=0)
    batch = collate(rows)
    model = continual(build_tiny_model(untied_t5_config(), seed=0), "seq2seq", gate_hidden=None)
    output = model(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], labels=batch["labels"])
    summed = F.cross_entropy(output.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    count = collate.loss_tokens(targets)
    torch.testing.assert_close(output.loss * count, summed)
    assert count == 5


@pytest.mark.parametrize("per_device_batch", [1, 2, 4])
def test_weighted_micro_batch_means_are_the_mean_over_the_steps_tokens(per_device_batch: int) -> None:
    answers = [1, 7, 2, 5, 3, 3, 8, 1]
    rows = _task_rows(_causal_rows([3] * len(answers), answers), CausalCollator(pad_id=0))
    losses = [torch.rand(a, generator=torch.Generator().manual_seed(i)).double() for i, a in enumerate(answers)]
    step = step_micro_batches(len(answers), global_batch=8, per_device_batch=per_device_batch, epoch=0, seed=3)[0]
    means = [torch.cat([losses[i] for i in micro]).mean() for micro in step]
    weighted = sum(w * m for w, m in zip(token_weights(rows, step), means, strict=True)) / len(step)
    everything = torch.cat(losses).mean()
    torch.testing.assert_close(weighted, everything)
    if per_device_batch < len(answers):
        assert abs(sum(means) / len(step) - everything) > 1e-3, "unweighted means would differ: the check can fail"


def test_a_global_batch_without_answer_tokens_is_an_error() -> None:
    rows = _task_rows([{"input_ids": [5, 6], "labels": [IGNORE, IGNORE], "prompt_mask": [1, 1]}] * 2, CausalCollator(0))
    with pytest.raises(CLScaleError, match="no answer tokens"):
        token_weights(rows, [[0], [1]])


def test_ranks_share_each_steps_micro_batches_in_turn() -> None:
    layout = {"global_batch": 12, "per_device_batch": 2, "epoch": 1, "seed": 7}
    steps = step_micro_batches(30, **layout)
    assert len(steps) == 2 and all(len(step) == 6 for step in steps), "the incomplete last batch is dropped"
    per_rank = [training_batches(30, world_size=3, rank=r, **layout) for r in range(3)]
    for rank, batches in enumerate(per_rank):
        assert batches == [micro for step in steps for micro in step[rank::3]]
    dealt = sorted(i for batches in per_rank for micro in batches for i in micro)
    assert dealt == sorted(i for step in steps for micro in step for i in micro) and len(set(dealt)) == 24
