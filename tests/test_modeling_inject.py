"""Injection of branched layers into decoder-only models and T5, and which stream each layer reads."""

from __future__ import annotations

import copy

import pytest
import torch
from modeling_fixtures import VOCAB, causal_config, continual, left_padded, random_tokens, right_padded
from torch import nn

from cl_scale.builtin.tiny import build_tiny_model, tiny_t5_config
from cl_scale.errors import CLScaleError
from cl_scale.modeling.branched_linear import BranchedLinear
from cl_scale.modeling.context import BranchContext
from cl_scale.modeling.inject import inject_branches

FAMILIES = ["llama", "mistral", "qwen2"]


def _t5_streams(targets: list[str]) -> dict[str, str]:
    model = continual(build_tiny_model(tiny_t5_config(VOCAB), seed=0), "seq2seq", targets=targets)
    return {path: layer.stream for path, layer in model.branched.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_query_and_value_projections_are_replaced(family: str) -> None:
    model = continual(build_tiny_model(causal_config(family), seed=0), "causal")
    layers = model.config.num_hidden_layers
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")}
    assert set(model.branched) == expected
    for path, layer in model.branched.items():
        assert model.base.get_submodule(path) is layer
    assert isinstance(model.base.get_submodule("model.layers.0.self_attn.k_proj"), nn.Linear)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_branches_leave_the_output_unchanged(family: str) -> None:
    base = build_tiny_model(causal_config(family), seed=0).eval()
    original = copy.deepcopy(base)
    model = continual(base, "causal")
    model.add_branches(torch.Generator().manual_seed(0))
    ids, mask = left_padded([random_tokens(8, seed=1), random_tokens(5, seed=2)])
    expected = original(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(model(ids, mask, mask).logits, expected, atol=0.0, rtol=0.0)


def test_t5_streams_follow_what_each_projection_reads() -> None:
    streams = _t5_streams(["q", "v"])
    for path, stream in streams.items():
        if path.startswith("encoder."):
            assert stream == "source", path
        elif ".EncDecAttention.v" in path:
            assert stream == "source", path
        else:
            assert stream == "target", path
    assert len(streams) == 2 * 2 + 2 * 2 + 2 * 2  # encoder self, decoder self, decoder cross; 2 layers


def test_t5_cross_attention_key_reads_the_source_and_output_the_target() -> None:
    streams = _t5_streams(["k", "o"])
    assert streams["decoder.block.0.layer.1.EncDecAttention.k"] == "source"
    assert streams["decoder.block.0.layer.1.EncDecAttention.o"] == "target"
    assert streams["decoder.block.0.layer.0.SelfAttention.k"] == "target"


def test_t5_cross_attention_value_branch_receives_the_encoder_output() -> None:
    model = continual(build_tiny_model(tiny_t5_config(VOCAB), seed=0), "seq2seq").eval()
    model.add_branches(torch.Generator().manual_seed(0))
    lengths: dict[str, int] = {}
    for name in ("v", "q"):
        layer = model.branched[f"decoder.block.1.layer.1.EncDecAttention.{name}"]
        layer.register_forward_pre_hook(lambda _m, args, name=name: lengths.__setitem__(name, args[0].shape[1]))
    source, source_mask = right_padded([random_tokens(9, seed=1), random_tokens(6, seed=2)])
    labels = torch.tensor([random_tokens(4, seed=3), random_tokens(4, seed=4)])
    model(source, source_mask, source_mask, labels=labels)
    assert lengths == {"v": 9, "q": 4}


def test_no_matching_target_names_the_targets_and_available_layers() -> None:
    base = build_tiny_model(causal_config("llama"), seed=0)
    with pytest.raises(CLScaleError) as error:
        continual(base, "causal", targets=["query", "value"])
    message = str(error.value)
    assert "query" in message and "value" in message
    assert "q_proj" in message and "down_proj" in message


def test_injection_reads_no_weight_data() -> None:
    base = build_tiny_model(causal_config("llama"), seed=0)
    for module in base.modules():
        if isinstance(module, nn.Linear):
            module.weight.data = torch.empty(0, dtype=module.weight.dtype)  # what a ZeRO-3 partition leaves
    branched = inject_branches(
        base, kind="causal", target_modules=["q_proj"], rank=2, alpha=4.0, dropout=0.0, context=BranchContext()
    )
    layer = branched["model.layers.0.self_attn.q_proj"]
    layer.add_branch(torch.Generator().manual_seed(0))
    a, b = layer.branch(0)
    assert isinstance(layer, BranchedLinear)
    assert a.shape == (2, base.config.hidden_size) and b.shape == (base.config.hidden_size, 2)
