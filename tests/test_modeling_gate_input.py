"""Gate inputs and coefficients depend on a sample's real prompt tokens only."""

from __future__ import annotations

import torch
from modeling_fixtures import causal_config, continual, grown, left_padded, random_tokens

from cl_scale.builtin.tiny import build_tiny_model
from cl_scale.modeling.wrapper import ContinualModel


def _gated() -> ContinualModel:
    return grown(continual(build_tiny_model(causal_config("llama"), seed=0), "causal", gate_hidden=16), tasks=2)


def _coefficients(model: ContinualModel, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    model.prepare(ids, mask, prompt)
    return model.context.coefficients


def test_coefficients_of_a_sample_are_the_same_alone_and_in_a_left_padded_batch() -> None:
    model = _gated()
    sample = random_tokens(5, seed=1)
    alone_ids, alone_mask = left_padded([sample])
    batch_ids, batch_mask = left_padded([random_tokens(11, seed=2), sample, random_tokens(8, seed=3)])
    alone = _coefficients(model, alone_ids, alone_mask, alone_mask)
    batched = _coefficients(model, batch_ids, batch_mask, batch_mask)
    torch.testing.assert_close(batched[1:2], alone, atol=1e-6, rtol=1e-6)


def test_answer_tokens_do_not_change_the_coefficients() -> None:
    model = _gated()
    prompt = random_tokens(6, seed=4)
    prompt_ids, prompt_mask = left_padded([prompt])
    ids, mask = left_padded([prompt + random_tokens(4, seed=5)])
    answer_excluded = mask.clone()
    answer_excluded[:, -4:] = 0
    torch.testing.assert_close(
        _coefficients(model, ids, mask, answer_excluded),
        _coefficients(model, prompt_ids, prompt_mask, prompt_mask),
        atol=1e-6,
        rtol=1e-6,
    )


def test_gate_input_is_the_mean_embedding_of_real_prompt_tokens() -> None:
    model = _gated()
    sample = random_tokens(4, seed=6)
    ids, mask = left_padded([sample, random_tokens(9, seed=7)], pad_id=17)
    expected = model.base.get_input_embeddings().weight[sample].mean(dim=0)
    xbar = model.gate_input(ids, mask)
    assert xbar.dtype == torch.float32 and not xbar.requires_grad
    torch.testing.assert_close(xbar[0], expected.detach(), atol=1e-6, rtol=1e-6)
