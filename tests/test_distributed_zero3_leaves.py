"""ZeRO-3 hooks whole transformer blocks (`distributed.zero3_block_leaves`): which modules become leaves,
and the first block's input requiring grad so a block's gradients exist before ZeRO-3 reduces them.

What this changes in training is checked against ZeRO-2 for every method in tests/test_train_methods.py.
"""

from __future__ import annotations

import torch
from deepspeed.utils import z3_leaf_module
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from cl_scale.distributed import zero3_block_leaves
from tests.modeling_fixtures import causal_config, continual, untied_t5_config


def test_each_decoder_layer_becomes_one_leaf_and_nothing_else() -> None:
    model = continual(AutoModelForCausalLM.from_config(causal_config("llama")), "causal", gate_hidden=8)
    blocks = zero3_block_leaves(model)
    layers = list(model.base.model.layers)
    assert len(layers) > 1 and {id(b) for b in blocks} == {id(layer) for layer in layers}
    assert [name for name, m in model.named_modules() if z3_leaf_module(m)] == [
        f"base.model.layers.{i}" for i in range(len(layers))
    ]


def test_encoder_and_decoder_blocks_of_t5_become_leaves() -> None:
    model = continual(AutoModelForSeq2SeqLM.from_config(untied_t5_config()), "seq2seq")
    zero3_block_leaves(model)
    leaves = [name for name, m in model.named_modules() if z3_leaf_module(m)]
    stacks = {"encoder": model.base.encoder.block, "decoder": model.base.decoder.block}
    assert leaves == [f"base.{stack}.block.{i}" for stack, blocks in stacks.items() for i in range(len(blocks))]


def test_the_first_blocks_input_requires_grad_so_its_branch_gradients_come_first() -> None:
    model = continual(AutoModelForCausalLM.from_config(causal_config("llama")), "causal")
    ids = torch.tensor([[5, 6, 7]])
    embeddings = model.base.get_input_embeddings()
    assert not embeddings(ids).requires_grad  # frozen: nothing asks for a gradient before
    zero3_block_leaves(model)
    assert embeddings(ids).requires_grad


def test_marking_twice_adds_no_second_hook() -> None:
    model = continual(AutoModelForCausalLM.from_config(causal_config("llama")), "causal")
    zero3_block_leaves(model)
    hooks = dict(model.base.get_input_embeddings()._forward_hooks)
    assert len(hooks) == 1
    zero3_block_leaves(model)
    assert dict(model.base.get_input_embeddings()._forward_hooks) == hooks


def test_a_model_that_names_no_blocks_is_left_as_it_is() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    assert zero3_block_leaves(model) == []
    assert not any(z3_leaf_module(m) for m in model.modules())
