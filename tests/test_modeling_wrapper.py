"""ContinualModel: what it freezes, what it names, what it puts into the context, what its forward returns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from modeling_fixtures import (
    causal_config,
    continual,
    grown,
    left_padded,
    random_tokens,
    right_padded,
    untied_t5_config,
)

from cl_scale.builtin.tiny import build_tiny_model
from cl_scale.errors import CLScaleError
from cl_scale.modeling.wrapper import ContinualModel


def _llama(gate_hidden: int | None = 16) -> ContinualModel:
    return continual(build_tiny_model(causal_config("llama"), seed=0), "causal", gate_hidden=gate_hidden)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded decoder-only batch: prompt + answer, with the loss on the answer only."""
    prompts = [random_tokens(5, seed=1), random_tokens(3, seed=2)]
    answers = [random_tokens(2, seed=3), random_tokens(4, seed=4)]
    ids, mask = left_padded([p + a for p, a in zip(prompts, answers)])
    labels = torch.full_like(ids, -100)
    prompt_mask = mask.clone()
    for row, answer in enumerate(answers):
        labels[row, -len(answer) :] = ids[row, -len(answer) :]
        prompt_mask[row, -len(answer) :] = 0
    return ids, mask, prompt_mask, labels


def test_base_is_frozen_at_construction() -> None:
    model = _llama()
    assert not any(p.requires_grad for p in model.base.parameters())


def test_branch_parameter_names_are_module_paths_and_gate_names() -> None:
    names = list(grown(_llama(), tasks=2).branch_parameters())
    layer = "model.layers.0.self_attn.q_proj"
    assert names[:4] == [f"{layer}.lora_A_0", f"{layer}.lora_B_0", f"{layer}.lora_A_1", f"{layer}.lora_B_1"]
    assert names[-3:] == ["gates.gate_W1_1", "gates.gate_W2_1", "gates.gate_key_1"]
    assert len(names) == len(set(names)) == 2 * 2 * 2 * 2 + 2 * 3  # layers x modules x tasks x (A, B) + gates


def test_branch_parameter_names_are_the_same_in_every_build() -> None:
    assert list(grown(_llama(), tasks=2).branch_parameters()) == list(grown(_llama(), tasks=2).branch_parameters())


def test_branch_parameters_are_every_parameter_added_after_construction() -> None:
    model = _llama()
    original = {id(p) for p in model.parameters()}
    grown(model, tasks=2)
    added = {id(p) for p in model.parameters()} - original
    assert {id(p) for p in model.branch_parameters().values()} == added


def test_branch_parameters_point_at_the_live_tensors() -> None:
    model = grown(_llama(), tasks=1)
    path, layer = next(iter(model.branched.items()))
    params = model.branch_parameters()
    assert params[f"{path}.lora_B_0"] is layer.branch(0)[1]
    assert params["gates.gate_key_0"] is model.gates.gate(0)[2]


def test_only_unfrozen_branch_and_gate_parameters_receive_gradients() -> None:
    model = grown(_llama(), tasks=2).train()
    trainable = {name: p for name, p in model.branch_parameters().items() if name.endswith("_1")}
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trainable.values():
        param.requires_grad_(True)
    ids, mask, prompt_mask, labels = _batch()
    model(ids, mask, prompt_mask, labels=labels).loss.backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == {id(p) for p in trainable.values()}
    assert all(p.grad.abs().sum() > 0 for p in trainable.values())


def test_add_branches_returns_the_new_index() -> None:
    model = _llama(gate_hidden=None)
    generator = torch.Generator().manual_seed(0)
    assert [model.add_branches(generator), model.add_branches(generator)] == [0, 1]
    assert model.num_branches == 2


def test_add_gate_without_a_gate_bank_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="gate_hidden"):
        _llama(gate_hidden=None).add_gate(torch.Generator().manual_seed(0))


def test_forward_loss_is_cross_entropy_on_labelled_tokens() -> None:
    model = grown(_llama(), tasks=1)
    ids, mask, prompt_mask, labels = _batch()
    output = model(ids, mask, prompt_mask, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


def test_prepare_without_gates_leaves_coefficients_unset() -> None:
    model = grown(_llama(gate_hidden=None), tasks=1)
    ids, mask, prompt_mask, _ = _batch()
    model.prepare(ids, mask, prompt_mask)
    assert model.context.coefficients is None
    assert torch.equal(model.context.masks["source"], mask)


def test_prepare_gives_one_coefficient_per_sample_and_gate() -> None:
    model = grown(_llama(), tasks=3)
    ids, mask, prompt_mask, _ = _batch()
    model.prepare(ids, mask, prompt_mask)
    assert model.context.coefficients.shape == (2, 3)


def test_seq2seq_target_mask_marks_labelled_decoder_positions() -> None:
    model = grown(continual(build_tiny_model(untied_t5_config(), seed=0), "seq2seq", gate_hidden=16), tasks=1)
    ids, mask = right_padded([random_tokens(6, seed=1), random_tokens(4, seed=2)])
    labels = torch.tensor([random_tokens(3, seed=3), random_tokens(1, seed=4) + [-100, -100]])
    model(ids, mask, mask, labels=labels)
    assert torch.equal(model.context.masks["target"], labels != -100)
    assert torch.equal(model.context.masks["source"], mask)


def test_forward_clears_the_previous_penalties() -> None:
    model = grown(_llama(), tasks=1)
    model.context.add_penalty("stale", torch.tensor(1.0))
    ids, mask, prompt_mask, labels = _batch()
    model(ids, mask, prompt_mask, labels=labels)
    assert model.context.penalties == {}


def _branch_gradients(activation_checkpointing: bool) -> dict[str, torch.Tensor]:
    model = grown(_llama(), tasks=2).train()
    if activation_checkpointing:
        model.base.activation_checkpointing_enable()
    ids, mask, prompt_mask, labels = _batch()
    model(ids, mask, prompt_mask, labels=labels, use_cache=False).loss.backward()
    return {name: p.grad for name, p in model.branch_parameters().items()}


def test_activation_checkpointing_keeps_branch_and_gate_gradients() -> None:
    """Coefficients reach the layers through the context, not as checkpoint inputs (reentrant checkpointing fails)."""
    expected = _branch_gradients(activation_checkpointing=False)
    actual = _branch_gradients(activation_checkpointing=True)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
