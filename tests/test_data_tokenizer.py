from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, T5Tokenizer

from cl_scale.data.prompts import build_prompt
from cl_scale.data.synthetic import SYNTHETIC_TASKS, load_synthetic
from cl_scale.data.tokenizer import train_sentencepiece_tokenizer
from cl_scale.errors import CLScaleError

from conftest import tokenizer_training_texts


def synthetic_prompts() -> list[str]:
    rows = [load_synthetic(t, "test", n_test=5)[:] for t in SYNTHETIC_TASKS]
    return [
        build_prompt(d, x, "long") + t
        for r in rows
        for d, x, t in zip(r["definition"], r["input"], r["target"])
    ]


def test_llama_tokenizer_loads_as_llama_with_llama_special_ids(llama_tokenizer: PreTrainedTokenizerBase) -> None:
    assert isinstance(llama_tokenizer, LlamaTokenizer)
    ids = (llama_tokenizer.unk_token_id, llama_tokenizer.bos_token_id, llama_tokenizer.eos_token_id)
    assert ids == (0, 1, 2)
    assert llama_tokenizer.pad_token_id is not None


def test_t5_tokenizer_loads_as_t5_with_t5_special_ids(t5_tokenizer: PreTrainedTokenizerBase) -> None:
    assert isinstance(t5_tokenizer, T5Tokenizer)
    ids = (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id, t5_tokenizer.unk_token_id)
    assert ids == (0, 1, 2)


def test_llama_tokenizer_prepends_bos_like_llama(llama_tokenizer: PreTrainedTokenizerBase) -> None:
    assert llama_tokenizer("a b c")["input_ids"][0] == 1


def test_t5_tokenizer_appends_eos_like_t5(t5_tokenizer: PreTrainedTokenizerBase) -> None:
    assert t5_tokenizer("a b c")["input_ids"][-1] == 1


def test_saved_tokenizer_reloads_with_the_same_ids(tmp_path: Path) -> None:
    trained = train_sentencepiece_tokenizer(tokenizer_training_texts(), tmp_path, vocab_size=400, kind="causal")
    text = "Sort the list alphabetically.\nc a b\nOutput: a b c"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == trained(text)["input_ids"]


def test_llama_tokenizer_round_trips_synthetic_prompts(llama_tokenizer: PreTrainedTokenizerBase) -> None:
    for text in synthetic_prompts():
        ids = llama_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llama_tokenizer.unk_token_id not in ids
        assert llama_tokenizer.decode(ids) == text


def test_llama_tokenizer_encodes_unseen_characters_through_bytes(llama_tokenizer: PreTrainedTokenizerBase) -> None:
    text = "Définition: Ω 中文 —\n\tend"
    ids = llama_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llama_tokenizer.unk_token_id not in ids
    assert llama_tokenizer.decode(ids) == text


def test_t5_tokenizer_round_trips_synthetic_prompts_up_to_whitespace(t5_tokenizer: PreTrainedTokenizerBase) -> None:
    for text in synthetic_prompts():
        ids = t5_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert t5_tokenizer.unk_token_id not in ids
        assert t5_tokenizer.decode(ids) == " ".join(text.split())


def test_too_small_a_vocabulary_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CLScaleError, match="raise vocab_size"):
        train_sentencepiece_tokenizer(tokenizer_training_texts(), tmp_path, vocab_size=50, kind="causal")


def test_unknown_kind_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CLScaleError, match="unknown tokenizer kind"):
        train_sentencepiece_tokenizer(["a b"], tmp_path, vocab_size=50, kind="encoder")  # type: ignore[arg-type]
