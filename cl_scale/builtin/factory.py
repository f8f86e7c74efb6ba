"""Built-in tiny models (`builtin:tiny-llama`, `builtin:tiny-t5`) for the CPU demo and quick runs.

A built-in model is an ordinary `save_pretrained` folder made once and cached, so the real loading path
runs on it: a sentencepiece tokenizer trained on the synthetic suite's texts, a small model from config,
and a short full fine-tuning on a DISJOINT synthetic mixture (other operations on the same kind of
inputs) so that LoRA on the frozen base has something to build on. Ranks that start together wait on a
file lock while one of them builds it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PretrainedConfig

from cl_scale.builtin.specs import BUILTINS, BuiltinSpec
from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config, tiny_t5_config
from cl_scale.cache import cache_root
from cl_scale.data.collators import CausalCollator, Seq2SeqCollator, tokenize_causal, tokenize_seq2seq
from cl_scale.data.prompts import build_prompt
from cl_scale.data.synthetic import SYNTHETIC_TASKS, load_synthetic, pretraining_examples
from cl_scale.data.tokenizer import train_sentencepiece_tokenizer
from cl_scale.errors import CLScaleError


def built_dir(name: str) -> Path:
    """Where built-in model `name` is (or will be) cached."""
    return cache_root() / "builtin" / f"{name}-v{BUILTINS[name].version}"


def spec_config(spec: BuiltinSpec, vocab_size: int, pad_token_id: int | None = None) -> PretrainedConfig:
    """The architecture of a built-in model: the one place that turns a spec into a config."""
    if spec.kind == "causal":
        extra = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
        return tiny_llama_config(vocab_size, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                                 kv_heads=spec.heads, intermediate=2 * spec.hidden, **extra)
    return tiny_t5_config(vocab_size, d_model=spec.hidden, layers=spec.layers, heads=spec.heads, d_ff=2 * spec.hidden)


def builtin_model_dir(name: str, progress: Callable[[str], None] = print) -> Path:
    """The folder of built-in model `name`, building it on first use (once, under a file lock)."""
    if name not in BUILTINS:
        raise CLScaleError(
            f"unknown built-in model `builtin:{name}`",
            f"use one of {', '.join('builtin:' + n for n in BUILTINS)}",
        )
    spec = BUILTINS[name]
    target = built_dir(name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            progress(f"building builtin:{name} once (tokenizer, model, short pre-training) into {target}")
            partial = target.parent / f".{target.name}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            _build(spec, partial)
            partial.rename(target)
    return target


def _build(spec: BuiltinSpec, out: Path) -> None:
    texts = []
    for task in SYNTHETIC_TASKS:
        ds = load_synthetic(task, "train", seed=0)
        texts += [build_prompt(d, x, "long") + t for d, x, t in zip(ds["definition"], ds["input"], ds["target"])]
    mixture = pretraining_examples(spec.pretrain_steps * spec.pretrain_batch // 4, seed=1)
    texts += [build_prompt(d, x, "long") + t for d, x, t in zip(mixture["definition"], mixture["input"], mixture["target"])]
    tokenizer = train_sentencepiece_tokenizer(texts, out, vocab_size=spec.vocab_size, kind=spec.kind)
    model = build_tiny_model(spec_config(spec, len(tokenizer), tokenizer.pad_token_id), seed=0)
    _pretrain(model, tokenizer, mixture, spec)
    model.save_pretrained(out)


def _pretrain(model, tokenizer, mixture, spec: BuiltinSpec) -> None:
    """Full fine-tuning on the disjoint mixture, single process, seeded."""
    mixture = mixture.add_column(
        "prompt", [build_prompt(d, x, "long") for d, x in zip(mixture["definition"], mixture["input"])]
    )
    if spec.kind == "causal":
        rows = tokenize_causal(mixture, tokenizer, max_source_length=128, max_target_length=32)
        collate = CausalCollator(tokenizer.pad_token_id)
    else:
        rows = tokenize_seq2seq(mixture, tokenizer, max_source_length=128, max_target_length=32)
        collate = Seq2SeqCollator(tokenizer.pad_token_id)
    columns = {name: rows[name] for name in rows.column_names if name != "id"}
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.pretrain_lr, total_steps=spec.pretrain_steps)
    model.train()
    for _ in range(spec.pretrain_steps):
        index = torch.randint(len(rows), (spec.pretrain_batch,), generator=generator).tolist()
        batch = collate([{name: values[i] for name, values in columns.items()} for i in index])
        batch.pop("prompt_mask")
        model(**batch).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
