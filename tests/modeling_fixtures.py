"""Builders shared by the modeling tests: tiny models, continual wrappers, non-trivial branches, padded batches."""

from __future__ import annotations

import torch
from transformers import MistralConfig, PretrainedConfig, PreTrainedModel, Qwen2Config

from cl_scale.builtin.tiny import tiny_llama_config, tiny_t5_config
from cl_scale.modeling.wrapper import ContinualModel

VOCAB = 320
RANK = 4
ALPHA = 8.0


def causal_config(family: str) -> PretrainedConfig:
    """A tiny decoder-only config of `family` ("llama", "mistral" or "qwen2") with the tiny Llama's sizes."""
    llama = tiny_llama_config(VOCAB)
    if family == "llama":
        return llama
    shared = dict(
        vocab_size=VOCAB,
        hidden_size=llama.hidden_size,
        num_hidden_layers=llama.num_hidden_layers,
        num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads,
        intermediate_size=llama.intermediate_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=llama.pad_token_id,
    )
    if family == "mistral":
        return MistralConfig(**shared)
    if family == "qwen2":
        return Qwen2Config(**shared)
    raise ValueError(family)


def untied_t5_config() -> PretrainedConfig:
    """Tiny T5 with its own output head: a random tied T5 just repeats the decoder start token (0)."""
    config = tiny_t5_config(VOCAB)
    config.tie_word_embeddings = False
    return config


def continual(
    base: PreTrainedModel, kind: str, *, gate_hidden: int | None = None, targets: list[str] | None = None
) -> ContinualModel:
    """`base` wrapped with rank-4 branches (and a gate bank when `gate_hidden` is given)."""
    return ContinualModel(
        base, kind=kind, target_modules=targets, rank=RANK, alpha=ALPHA, dropout=0.0, gate_hidden=gate_hidden
    )


def grown(model: ContinualModel, tasks: int, *, seed: int = 1, b_std: float = 0.5) -> ContinualModel:
    """Add `tasks` branches (and gates, when the model has a bank) with non-zero B's; returns eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        model.add_branches(generator)
        if model.gates is not None:
            model.add_gate(generator)
    with torch.no_grad():
        for layer in model.branched.values():
            for _, b in layer.branches():
                b.normal_(0.0, b_std, generator=generator)
    return model.eval()


def left_padded(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every sequence padded on the left to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence)
        mask[row, width - len(sequence) :] = 1
    return ids, mask


def right_padded(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every sequence padded on the right to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def random_tokens(count: int, seed: int) -> list[int]:
    """`count` ordinary token ids (no special ids), reproducible from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (count,), generator=generator).tolist()


@torch.no_grad()
def copy_branch_into_peft(model: ContinualModel, peft_model: torch.nn.Module, index: int = 0) -> None:
    """Set the PEFT model's default LoRA adapter to branch `index` of every branched layer (same paths)."""
    for path, layer in model.branched.items():
        a, b = layer.branch(index)
        peft_layer = peft_model.base_model.model.get_submodule(path)
        peft_layer.lora_A["default"].weight.copy_(a)
        peft_layer.lora_B["default"].weight.copy_(b)
