"""The continual model: a frozen Hugging Face model with LoRA branches and (optionally) GainLoRA gates.

It owns the per-forward `BranchContext`: before the Hugging Face model runs it stores the token masks
and the gate coefficients computed from the prompt, so every branched layer reads the same values.
Generation computes the coefficients once from the prompt and keeps them for every decoding step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from cl_scale.errors import CLScaleError
from cl_scale.modeling.branched_linear import BranchedLinear
from cl_scale.modeling.context import BranchContext
from cl_scale.modeling.gates import GateBank
from cl_scale.modeling.inject import ModelKind, inject_branches
from cl_scale.rundir import branch_tensor_name

IGNORE_INDEX = -100
"""Label value Hugging Face losses skip (padding and, for decoder-only models, the prompt)."""

_TOKEN_IDS = ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")


class ContinualModel(nn.Module):
    """A frozen base model whose target layers carry per-task LoRA branches, plus an optional gate bank.

    The base's `generation_config` is replaced by one holding only its special token ids: `generate`
    fills every option a call leaves unset from it, and checkpoints ship sampling and length defaults
    (Llama-2: do_sample, temperature, top_p, max_length) that must not leak into greedy evaluation.
    """

    def __init__(
        self,
        base: PreTrainedModel,
        *,
        kind: ModelKind,
        target_modules: Sequence[str] | None,
        rank: int,
        alpha: float,
        dropout: float,
        gate_hidden: int | None,
    ) -> None:
        super().__init__()
        base.requires_grad_(False)
        base.generation_config = GenerationConfig(**{name: _token_id(base, name) for name in _TOKEN_IDS})
        self.base = base
        self.kind = kind
        self.context = BranchContext()
        self.branched: dict[str, BranchedLinear] = inject_branches(
            base,
            kind=kind,
            target_modules=target_modules,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            context=self.context,
        )
        embedding_dim = base.get_input_embeddings().embedding_dim
        self.gates = None if gate_hidden is None else GateBank(embedding_dim, gate_hidden)

    @property
    def config(self) -> PretrainedConfig:
        return self.base.config

    @property
    def num_branches(self) -> int:
        """Branches per layer (every branched layer has the same number)."""
        return next(iter(self.branched.values())).num_branches

    def add_branches(self, generator: torch.Generator | None = None) -> int:
        """Append one branch (B = 0, output unchanged) to every branched layer; returns its index."""
        indices = {layer.add_branch(generator) for layer in self.branched.values()}
        (index,) = indices
        return index

    def add_gate(self, generator: torch.Generator | None = None) -> int:
        """Append one gate to the gate bank, in the base model's dtype and on its device; returns its index."""
        if self.gates is None:
            raise CLScaleError(
                "this model has no gate bank, so it cannot add a gate",
                "build it with gate_hidden set (GainLoRA's method.gate.hidden)",
            )
        return self.gates.add_gate(generator, dtype=self.base.dtype, device=self.base.device)

    def gate_input(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """`xbar` (batch, d): mean frozen input embedding over each sample's real prompt tokens, in float32.

        Dividing by each sample's own prompt length (not the padded length) makes a sample's gate
        coefficients independent of the batch it is in and of the answer tokens appended to it.
        """
        with torch.no_grad():
            embeddings = self.base.get_input_embeddings()(input_ids).float()
            mask = prompt_mask.to(embeddings.dtype).unsqueeze(-1)
            counts = mask.sum(dim=1).clamp_min(1.0)
            return (embeddings * mask).sum(dim=1) / counts

    def prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Fill the context for the next forward (or generation): token masks and gate coefficients."""
        self.context.reset()
        self.context.masks["source"] = attention_mask
        if self.kind == "seq2seq" and labels is not None:
            self.context.masks["target"] = labels != IGNORE_INDEX
        if self.gates is not None and self.gates.num_gates > 0:
            self.context.coefficients = self.gates(self.gate_input(input_ids, prompt_mask))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ModelOutput:
        """The Hugging Face model's output; layer penalties are left in `self.context.penalties`."""
        self.prepare(input_ids, attention_mask, prompt_mask, labels)
        return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        synced_gpus: bool = False,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache; returns only the new tokens, padded with pad id after EOS.

        Decoder-only prompts must be left-padded. Pass `synced_gpus=True` under ZeRO-3 so every rank
        keeps stepping until all ranks are done.
        """
        self.prepare(input_ids, attention_mask, prompt_mask)
        self.context.stacks = {}  # the weights stay fixed while this generation decodes
        try:
            output = self.base.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=greedy_config(self.base, max_new_tokens),
                synced_gpus=synced_gpus,
            )
        finally:
            self.context.stacks = None
        start = input_ids.shape[1] if self.kind == "causal" else 1  # T5 output starts with decoder start
        return output[:, start:]

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every transformer block in the one form that works with a frozen base under ZeRO-3.

        Non-reentrant, because the reentrant form passes no gradient to the branches of a block whose
        inputs do not require grad, and back-propagates GainLoRA's gate graph once per block (every block
        reads the gate coefficients from outside its inputs), which fails on the second block.
        `determinism_check="none"`, because ZeRO-3 (deepspeed 0.19.8) re-partitions a frozen weight when the
        recompute's forward hooks fire, so torch's recompute check sees shape [0] for a weight that
        DeepSpeed gathers again before the backward uses it (huggingface/transformers#47254). The tests
        compare losses, gradient norms and snapshots with and without checkpointing on 2 ranks.
        """
        self.base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "determinism_check": "none"}
        )

    def branch_parameters(self) -> dict[str, nn.Parameter]:
        """Every branch and gate parameter under a stable name, oldest task first, for snapshots."""
        params: dict[str, nn.Parameter] = {}
        for path, layer in self.branched.items():
            for index, (a, b) in enumerate(layer.branches()):
                params[branch_tensor_name(path, "A", index)] = a
                params[branch_tensor_name(path, "B", index)] = b
        if self.gates is not None:
            params.update({f"gates.{name}": param for name, param in self.gates.named_parameters()})
        return params


def greedy_config(base: PreTrainedModel, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding with the KV cache, with the model's current special token ids."""
    pad_token_id = _token_id(base, "pad_token_id")
    if pad_token_id is None:
        raise CLScaleError(
            "the model has no pad token id, which generation needs to fill sequences that ended",
            "set model.pad_token_id in the recipe (the published Llama-2 runs used 1)",
        )
    ids = {name: _token_id(base, name) for name in _TOKEN_IDS}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True, **ids)


def _token_id(base: PreTrainedModel, name: str) -> int | list[int] | None:
    """A special token id from the model config, else from its generation config (configs define only some)."""
    value = getattr(base.config, name, None)
    return value if value is not None else getattr(base.generation_config, name, None)
