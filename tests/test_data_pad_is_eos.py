"""A tokenizer like SmolLM2's: pad = EOS, and a BOS token it defines but never adds to a text.

With pad = EOS the answer's EOS must still be scored and padding told apart by the masks, never by the
id; a BOS the tokenizer does not add itself must not be prepended (for SmolLM2 it opens a chat turn).
"""

from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer
from transformers import PreTrainedTokenizerBase as Tokenizer

from cl_scale.data.collators import (
    IGNORE_INDEX,
    CausalCollator,
    tokenize_causal,
    tokenize_causal_prompts,
)

PROMPTS = ["Sort the list alphabetically.\nc a b\nOutput: ", "Count.\na\nOutput: "]
TARGETS = ["a b c", "1"]


@pytest.fixture(scope="module")
def eos_padded(llama_tokenizer_dir: Path) -> Tokenizer:
    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir, add_bos_token=False, pad_token="</s>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.bos_token_id is not None
    return tokenizer


def rows(tokenizer: Tokenizer, source: int = 64) -> Dataset:
    ds = Dataset.from_dict({"id": ["a", "b"], "prompt": PROMPTS, "target": TARGETS})
    return tokenize_causal(ds, tokenizer, max_source_length=source, max_target_length=8)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_bos_the_tokenizer_does_not_add_is_not_prepended(eos_padded: Tokenizer) -> None:
    assert rows(eos_padded)[0]["input_ids"][: len(encode(eos_padded, PROMPTS[0]))] == encode(eos_padded, PROMPTS[0])


def test_generation_prompts_match_training_prompts_without_bos(eos_padded: Tokenizer) -> None:
    ds = Dataset.from_dict({"id": ["a"], "prompt": PROMPTS[:1]})
    prompt = tokenize_causal_prompts(ds, eos_padded, max_source_length=64)[0]["input_ids"]
    assert prompt == encode(eos_padded, PROMPTS[0])


def test_a_bos_the_tokenizer_adds_is_still_prepended(llama_tokenizer: Tokenizer) -> None:
    assert rows(llama_tokenizer)[0]["input_ids"][0] == llama_tokenizer.bos_token_id


def test_truncation_without_bos_keeps_the_prompt_end_at_full_length(eos_padded: Tokenizer) -> None:
    full = encode(eos_padded, PROMPTS[0])
    row = rows(eos_padded, source=6)[0]
    assert row["input_ids"][:6] == full[-6:]


def test_padded_batch_scores_the_answer_eos_and_no_padding(eos_padded: Tokenizer) -> None:
    batch = CausalCollator(eos_padded.pad_token_id)([{k: v for k, v in r.items() if k != "id"} for r in rows(eos_padded)])
    eos = eos_padded.eos_token_id
    short = 1  # "Count" is the shorter row, so it is the padded one
    padding = batch["attention_mask"][short] == 0
    assert padding.any() and (batch["input_ids"][short][padding] == eos).all()
    for i, target in enumerate(TARGETS):
        scored = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert scored == encode(eos_padded, target) + [eos]
    assert (batch["labels"][short][padding] == IGNORE_INDEX).all()
    assert (batch["prompt_mask"][short][padding] == 0).all()
