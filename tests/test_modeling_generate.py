"""Greedy generation with the KV cache equals recomputing every step, with gate coefficients from the prompt."""

from __future__ import annotations

import pytest
import torch
from modeling_fixtures import (
    causal_config,
    continual,
    grown,
    left_padded,
    random_tokens,
    right_padded,
    untied_t5_config,
)
from transformers import GenerationConfig

from cl_scale.builtin.tiny import build_tiny_model
from cl_scale.errors import CLScaleError
from cl_scale.modeling.wrapper import ContinualModel

NEW_TOKENS = 8


def _gated_llama() -> ContinualModel:
    return grown(continual(build_tiny_model(causal_config("llama"), seed=0), "causal", gate_hidden=16), tasks=2)


def _gated_t5() -> ContinualModel:
    return grown(continual(build_tiny_model(untied_t5_config(), seed=0), "seq2seq", gate_hidden=16), tasks=2)


def _prompts() -> list[list[int]]:
    return [random_tokens(7, seed=1), random_tokens(3, seed=2), random_tokens(10, seed=3)]


def _greedy_steps(model: ContinualModel, logits_of, batch: int, eos: int, pad: int) -> torch.Tensor:
    """New tokens chosen one at a time from `logits_of(tokens so far)`, pad after EOS, stop when all ended."""
    new = torch.empty(batch, 0, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    for _ in range(NEW_TOKENS):
        token = logits_of(new).argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new = torch.cat([new, token[:, None]], dim=1)
        finished |= token == eos
        if finished.all():
            break
    return new


def _causal_without_cache(model: ContinualModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.prepare(ids, mask, mask)

    def logits_of(new: torch.Tensor) -> torch.Tensor:
        full_ids = torch.cat([ids, new], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        positions = (full_mask.cumsum(dim=1) - 1).clamp_min(0)
        out = model.base(input_ids=full_ids, attention_mask=full_mask, position_ids=positions, use_cache=False)
        return out.logits[:, -1]

    config = model.config
    return _greedy_steps(model, logits_of, ids.shape[0], config.eos_token_id, config.pad_token_id)


def _seq2seq_without_cache(model: ContinualModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.prepare(ids, mask, mask)
    config = model.config
    start = torch.full((ids.shape[0], 1), config.decoder_start_token_id, dtype=torch.long)

    def logits_of(new: torch.Tensor) -> torch.Tensor:
        decoder_ids = torch.cat([start, new], dim=1)
        out = model.base(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False)
        return out.logits[:, -1]

    return _greedy_steps(model, logits_of, ids.shape[0], config.eos_token_id, config.pad_token_id)


@torch.no_grad()
def test_llama_cached_generation_equals_recomputing_every_step() -> None:
    model = _gated_llama()
    ids, mask = left_padded(_prompts())
    actual = model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)  # first, so it must set its own context
    expected = _causal_without_cache(model, ids, mask)
    assert len(set(expected.flatten().tolist())) > 3  # the check is not vacuous
    torch.testing.assert_close(actual, expected)


@torch.no_grad()
def test_generation_uses_branch_weights_changed_since_the_previous_generation() -> None:
    model = _gated_llama()
    ids, mask = left_padded(_prompts())
    before = model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)
    generator = torch.Generator().manual_seed(5)
    for layer in model.branched.values():
        for _, b in layer.branches():
            b.normal_(0.0, 1.0, generator=generator)
    actual = model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)
    assert not torch.equal(actual, before)  # the new weights matter, so stale ones would show
    torch.testing.assert_close(actual, _causal_without_cache(model, ids, mask))


@torch.no_grad()
def test_t5_cached_generation_equals_recomputing_every_step() -> None:
    model = _gated_t5()
    ids, mask = right_padded(_prompts())
    actual = model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)
    expected = _seq2seq_without_cache(model, ids, mask)
    assert len(set(expected.flatten().tolist())) > 3
    torch.testing.assert_close(actual, expected)


@torch.no_grad()
def test_tokens_after_eos_are_padding() -> None:
    model = _gated_llama()
    ids, mask = left_padded(_prompts())
    free = model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)
    first = free[0].tolist()
    step = next(i for i in range(1, len(first)) if first[i] not in first[:i] and first[i] not in free[1:, : i + 1])
    model.config.eos_token_id = first[step]  # make sample 0 end at `step`, before the others
    ended = model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)
    assert ended[0, : step + 1].tolist() == first[: step + 1]
    assert (ended[0, step + 1 :] == model.config.pad_token_id).all()
    assert ended.shape[1] > step + 1


@torch.no_grad()
def test_generation_ignores_the_checkpoints_decoding_defaults() -> None:
    base = build_tiny_model(causal_config("llama"), seed=0)
    base.generation_config = GenerationConfig(
        do_sample=True, temperature=5.0, repetition_penalty=50.0, no_repeat_ngram_size=1, suppress_tokens=[17]
    )
    model = grown(continual(base, "causal", gate_hidden=16), tasks=2)
    ids, mask = left_padded(_prompts())
    torch.manual_seed(0)
    actual = model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)
    torch.testing.assert_close(actual, _gated_llama().generate(ids, mask, mask, max_new_tokens=NEW_TOKENS))


def test_generation_without_a_pad_id_is_an_error() -> None:
    base = build_tiny_model(causal_config("llama"), seed=0)
    base.config.pad_token_id = None
    base.generation_config.pad_token_id = None
    model = continual(base, "causal")
    ids, mask = left_padded(_prompts())
    with pytest.raises(CLScaleError, match="pad_token_id"):
        model.generate(ids, mask, mask, max_new_tokens=NEW_TOKENS)
