"""Tiny Llama and T5 models built from configs, for the tests and the CPU demo.

Special token ids follow the sentencepiece tokenizers cl-scale trains (`cl_scale.data.tokenizer`), so a
tiny model and its tokenizer agree without extra wiring: Llama-style (unk 0, bos 1, eos 2, pad 3) and
T5-style (pad 0, eos 1, decoder start 0).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 512,
    pad_token_id: int = 3,
) -> LlamaConfig:
    """A small Llama config; grouped-query attention (kv_heads < heads) by default, so both head layouts get tested.

    The pad id is always set (Llama-2 itself has none, and generation needs one to fill after EOS);
    the default is the one `cl_scale.data.tokenizer` gives its Llama-style tokenizers.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def tiny_t5_config(vocab_size: int, *, d_model: int = 64, layers: int = 2, heads: int = 4, d_ff: int = 128) -> T5Config:
    """A small T5 config (pad 0, eos 1, decoder start 0), without dropout so the demo is deterministic."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def build_tiny_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A randomly initialised model for `config`, identical for the same seed, leaving the global RNG alone."""
    factory = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory.from_config(config)
    return model
