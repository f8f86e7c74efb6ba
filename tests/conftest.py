"""Shared fixtures: the real benchmark folder (skipped when absent) and tokenizers trained on the fly."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cl_scale.data.prompts import build_prompt
from cl_scale.data.synthetic import SYNTHETIC_TASKS, load_synthetic, pretraining_texts
from cl_scale.data.tokenizer import train_sentencepiece_tokenizer
from cl_scale.distributed import STRICT_ENV

CL_BENCHMARK = Path(__file__).resolve().parents[1].parent / "shared" / "CL_Benchmark"

# Strict collectives for this process and every process a test launches (they inherit the environment):
# a tensor off the backend's communication device fails here as it would under NCCL (docs/DISTRIBUTED.md).
os.environ.setdefault(STRICT_ENV, "1")

# Lines shaped like both published prompt formats, so benchmark-like text tokenises without surprises.
_BENCHMARK_LIKE = [
    'Definition: In this task, you are given sentences from movie reviews. Classify it as "POS" or "NEG".\n\n'
    "Now complete the following example -\nInput: It's a charming, often affecting journey (2002)!\nOutput: POS",
    "Given a pair of sentences 1 and 2, identify the relationship between them.\n"
    "sentence 1: He couldn't lie; he said so.\nsentence 2: She did?\nOutput: contradiction",
    "I will give you some category entries from Wikipedia, please classify them by topic.\n"
    "Title: William V. Brady\nText: The 68th Mayor of New York City from 1847 to 1848.\nOutput: Office Holder",
    " ".join(string.ascii_letters + string.digits + string.punctuation),
]


def tokenizer_training_texts() -> list[str]:
    """Synthetic prompts with answers, pre-training texts and a few benchmark-like lines."""
    texts = pretraining_texts(200, seed=0) + _BENCHMARK_LIKE
    for task in SYNTHETIC_TASKS:
        ds = load_synthetic(task, "train", n_train=40, n_test=1)
        texts += [build_prompt(d, x, "long") + t for d, x, t in zip(ds["definition"], ds["input"], ds["target"])]
    return texts


@pytest.fixture(scope="session")
def cl_benchmark() -> Path:
    """The real CL_Benchmark folder next to the repository."""
    if not CL_BENCHMARK.is_dir():
        pytest.skip(f"real benchmark data not found at {CL_BENCHMARK} (it belongs at ../shared/CL_Benchmark)")
    return CL_BENCHMARK


def _trained_tokenizer(tmp_path_factory: pytest.TempPathFactory, kind: str, vocab_size: int) -> Path:
    out = tmp_path_factory.mktemp(f"{kind}_tokenizer")
    train_sentencepiece_tokenizer(tokenizer_training_texts(), out, vocab_size=vocab_size, kind=kind)
    return out


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved Llama-style tokenizer (bos 1, eos 2, unk 0, pad 3, byte fallback)."""
    return _trained_tokenizer(tmp_path_factory, "causal", 400)


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)


@pytest.fixture(scope="session")
def t5_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved T5-style tokenizer (pad 0, eos 1, unk 2)."""
    return _trained_tokenizer(tmp_path_factory, "seq2seq", 300)


@pytest.fixture(scope="session")
def t5_tokenizer(t5_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(t5_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, llama_tokenizer_dir: Path) -> Path:
    """A saved tiny Llama (random weights) with its sentencepiece tokenizer: a real `from_pretrained` folder."""
    import shutil

    from cl_scale.builtin.tiny import build_tiny_model, tiny_llama_config

    out = tmp_path_factory.mktemp("tiny_llama")
    for item in llama_tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    build_tiny_model(config, seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory, t5_tokenizer_dir: Path) -> Path:
    """A saved tiny T5 (random weights, tied embeddings like t5-large) with its sentencepiece tokenizer.

    Tied on purpose: transformers 5.23's ZeRO-3 loader ties an untied T5's head and input embeddings
    back to `shared`, while its plain loader keeps them apart, so an untied checkpoint would load as two
    different models.
    """
    import shutil

    from cl_scale.builtin.tiny import build_tiny_model, tiny_t5_config

    out = tmp_path_factory.mktemp("tiny_t5")
    for item in t5_tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    build_tiny_model(tiny_t5_config(len(AutoTokenizer.from_pretrained(out))), seed=0).save_pretrained(out)
    return out
