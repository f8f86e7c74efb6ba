"""Load the tokenizer and the frozen base model a recipe names, partitioned by ZeRO-3 from the first byte.

The transformers DeepSpeed integration object must exist BEFORE `from_pretrained` for the weights to be
loaded straight into partitions; `load_base_model` takes the DeepSpeed config and keeps that object alive
for as long as the caller holds the returned handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cl_scale.builtin.factory import builtin_model_dir
from cl_scale.builtin.specs import BUILTIN_PREFIX
from cl_scale.ds_config import zero_stage
from cl_scale.errors import CLScaleError

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from cl_scale.recipe import ModelConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_dir(model_cfg: ModelConfig) -> str:
    """The local directory or hub id to load from (building a built-in model on first use)."""
    path: str = model_cfg.path
    if path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(path[len(BUILTIN_PREFIX) :]))
    return path


def _missing_model(path: str, err: Exception) -> CLScaleError:
    return CLScaleError(
        f"cannot load model `{path}`: {err}",
        "download it once with `huggingface-cli download " + path + " --local-dir <dir>` (gated Llama-2 needs an "
        "accepted licence and `huggingface-cli login`) and set model.path to that directory, or use a built-in "
        "model (builtin:tiny-llama, builtin:tiny-t5)",
    )


def load_config(model_cfg: ModelConfig) -> PretrainedConfig:
    """The model's transformers config, or a clear error saying how to get the model."""
    path = model_dir(model_cfg)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _missing_model(path, err) from err


def resolve_kind(model_cfg: ModelConfig, config: PretrainedConfig) -> Literal["causal", "seq2seq"]:
    """`model.kind`, with "auto" decided by whether the architecture is encoder-decoder."""
    if model_cfg.kind != "auto":
        return model_cfg.kind
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, with the recipe's pad id applied (Llama-2 has no pad token)."""
    path = model_dir(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _missing_model(path, err) from err
    if model_cfg.pad_token_id is not None:
        tokenizer.pad_token_id = model_cfg.pad_token_id
    if tokenizer.pad_token_id is None:
        raise CLScaleError(
            f"the tokenizer of `{model_cfg.path}` has no pad token",
            "set model.pad_token_id in the recipe (the published Llama-2 runs used 1)",
        )
    return tokenizer


@dataclass
class LoadedModel:
    """The base model plus the object that keeps transformers' ZeRO-3 integration switched on."""

    model: PreTrainedModel
    kind: Literal["causal", "seq2seq"]
    zero3_handle: HfDeepSpeedConfig | None = None


def load_base_model(model_cfg: ModelConfig, ds_config: dict[str, Any] | None, pad_token_id: int) -> LoadedModel:
    """Load the frozen base; with a ZeRO-3 `ds_config` every rank only ever holds its partition.

    `pad_token_id` (the tokenizer's, after the recipe's override) goes into the model's configs, since
    generation pads finished sequences with it.
    """
    path = model_dir(model_cfg)
    config = load_config(model_cfg)
    kind = resolve_kind(model_cfg, config)
    handle = None
    if ds_config is not None and zero_stage(ds_config) == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(ds_config)
    factory = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = factory.from_pretrained(
            path,
            dtype=DTYPES[model_cfg.dtype],
            attn_implementation=model_cfg.attn_implementation,
        )
    except (OSError, ValueError) as err:
        raise _missing_model(path, err) from err
    model.config.pad_token_id = pad_token_id
    model.generation_config.pad_token_id = pad_token_id
    model.requires_grad_(False)
    return LoadedModel(model, kind, handle)
