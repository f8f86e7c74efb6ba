from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase as Tokenizer

from cl_scale.data import collators
from cl_scale.data.collators import (
    IGNORE_INDEX,
    CausalCollator,
    Seq2SeqCollator,
    tokenize_causal,
    tokenize_causal_prompts,
    tokenize_seq2seq,
)
from cl_scale.errors import CLScaleError

LONG_PROMPT = "Reverse the list.\n" + "a b c d " * 60 + "\nOutput: "


def examples(prompts: list[str], targets: list[str]) -> Dataset:
    return Dataset.from_dict({"id": [f"x-{i}" for i in range(len(prompts))], "prompt": prompts, "target": targets})


def causal(ds: Dataset, tokenizer: Tokenizer, source: int = 64, target: int = 16, **kwargs: object) -> Dataset:
    return tokenize_causal(ds, tokenizer, max_source_length=source, max_target_length=target, **kwargs)


def seq2seq(ds: Dataset, tokenizer: Tokenizer, source: int = 64, target: int = 8) -> Dataset:
    return tokenize_seq2seq(ds, tokenizer, max_source_length=source, max_target_length=target)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def scored(row: dict) -> list[int]:
    return [label for label in row["labels"] if label != IGNORE_INDEX]


@pytest.fixture
def pair() -> Dataset:
    prompts = ["Sort the list alphabetically.\nc a b\nOutput: ", "Count the items in the list.\na\nOutput: "]
    return examples(prompts, ["a b c", "1"])


def test_causal_loss_covers_only_the_answer_and_eos(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    row = causal(pair, llama_tokenizer)[0]
    assert scored(row) == encode(llama_tokenizer, "a b c") + [llama_tokenizer.eos_token_id]
    assert row["labels"][-len(scored(row)) :] == row["input_ids"][-len(scored(row)) :]


def test_causal_prompt_mask_marks_exactly_the_unscored_prompt(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    row = causal(pair, llama_tokenizer)[0]
    assert row["prompt_mask"] == [int(label == IGNORE_INDEX) for label in row["labels"]]


def test_causal_sequence_starts_with_bos(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    assert causal(pair, llama_tokenizer)[0]["input_ids"][0] == llama_tokenizer.bos_token_id


def test_generation_prompt_equals_the_training_prompt(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    train = causal(pair, llama_tokenizer)[0]
    prompt = tokenize_causal_prompts(pair, llama_tokenizer, max_source_length=64)[0]
    assert prompt["input_ids"] == train["input_ids"][: sum(train["prompt_mask"])]


def test_trailing_space_in_answer_tokenises_exactly_prompt_plus_answer(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    def text(row: dict) -> str:
        return llama_tokenizer.decode(row["input_ids"], skip_special_tokens=True)

    moved, published = causal(pair, llama_tokenizer, space_in_answer=True), causal(pair, llama_tokenizer)
    assert [text(row) for row in moved] == [p + t for p, t in zip(pair["prompt"], pair["target"])]
    prompt = [t for t, m in zip(moved[0]["input_ids"], moved[0]["prompt_mask"]) if m]
    assert llama_tokenizer.decode(prompt).endswith("Output:")
    # Not vacuous: the published layout gives a SentencePiece answer its own word-start mark after the
    # prompt's lone space token, so the sequence reads "Output:  a b c" (two spaces).
    assert text(published[0]) != pair["prompt"][0] + pair["target"][0]


def test_trailing_space_in_answer_gives_generation_the_training_prompt(
    llama_tokenizer: Tokenizer, pair: Dataset
) -> None:
    train = causal(pair, llama_tokenizer, space_in_answer=True)[1]
    prompt = tokenize_causal_prompts(pair, llama_tokenizer, max_source_length=64, space_in_answer=True)[1]
    assert prompt["input_ids"] == train["input_ids"][: sum(train["prompt_mask"])]
    assert prompt["input_ids"] != tokenize_causal_prompts(pair, llama_tokenizer, max_source_length=64)[1]["input_ids"]


def test_long_prompt_is_cut_from_the_left_keeping_its_end(llama_tokenizer: Tokenizer) -> None:
    row = causal(examples([LONG_PROMPT], ["d c b a"]), llama_tokenizer, source=20)[0]
    prompt = row["input_ids"][: sum(row["prompt_mask"])]
    assert prompt == [llama_tokenizer.bos_token_id] + encode(llama_tokenizer, LONG_PROMPT)[-19:]


def test_prompt_truncation_never_cuts_the_answer(llama_tokenizer: Tokenizer) -> None:
    row = causal(examples([LONG_PROMPT], ["d c b a"]), llama_tokenizer, source=20)[0]
    assert scored(row) == encode(llama_tokenizer, "d c b a") + [llama_tokenizer.eos_token_id]


def test_answer_is_cut_by_max_target_length_keeping_eos(llama_tokenizer: Tokenizer) -> None:
    row = causal(examples(["p\nOutput: "], ["a b c d e f g h"]), llama_tokenizer, target=4)[0]
    assert scored(row) == encode(llama_tokenizer, "a b c d e f g h")[:3] + [llama_tokenizer.eos_token_id]


def test_causal_collator_pads_on_the_left(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    rows = causal(pair, llama_tokenizer)
    batch = CausalCollator(pad_id=llama_tokenizer.pad_token_id)(list(rows))
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    pad = batch["input_ids"].shape[1] - len(rows[short]["input_ids"])
    assert pad > 0
    assert batch["input_ids"][short, :pad].tolist() == [llama_tokenizer.pad_token_id] * pad
    assert batch["input_ids"][short, pad:].tolist() == rows[short]["input_ids"]
    assert batch["attention_mask"][short].tolist() == [0] * pad + [1] * len(rows[short]["input_ids"])


def test_causal_collator_puts_no_loss_on_padding(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    batch = CausalCollator(pad_id=3)(list(causal(pair, llama_tokenizer)))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_causal_prompt_mask_excludes_padding_and_answer(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    batch = CausalCollator(pad_id=3)(list(causal(pair, llama_tokenizer)))
    expected = (batch["attention_mask"] == 1) & (batch["labels"] == IGNORE_INDEX)
    assert torch.equal(batch["prompt_mask"].bool(), expected)


def test_generation_batch_prompt_mask_equals_attention_mask(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    batch = CausalCollator(pad_id=3)(list(tokenize_causal_prompts(pair, llama_tokenizer, max_source_length=64)))
    assert "labels" not in batch
    assert torch.equal(batch["prompt_mask"], batch["attention_mask"])


def test_generation_batch_is_left_padded(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    batch = CausalCollator(pad_id=3)(list(tokenize_causal_prompts(pair, llama_tokenizer, max_source_length=64)))
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][:, 0].tolist() != [1, 1]


def test_seq2seq_source_is_cut_keeping_eos(t5_tokenizer: Tokenizer) -> None:
    row = seq2seq(examples([LONG_PROMPT], ["a"]), t5_tokenizer, source=10)[0]
    assert row["input_ids"] == encode(t5_tokenizer, LONG_PROMPT)[:9] + [t5_tokenizer.eos_token_id]


def test_seq2seq_labels_are_target_and_eos(t5_tokenizer: Tokenizer, pair: Dataset) -> None:
    assert seq2seq(pair, t5_tokenizer)[0]["labels"] == encode(t5_tokenizer, "a b c") + [t5_tokenizer.eos_token_id]


def test_seq2seq_collator_pads_on_the_right(t5_tokenizer: Tokenizer, pair: Dataset) -> None:
    rows = seq2seq(pair, t5_tokenizer)
    batch = Seq2SeqCollator(pad_id=t5_tokenizer.pad_token_id)(list(rows))
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"][batch["attention_mask"] == 0].eq(t5_tokenizer.pad_token_id).all()


def test_seq2seq_collator_pads_labels_with_ignore_index(t5_tokenizer: Tokenizer, pair: Dataset) -> None:
    rows = seq2seq(pair, t5_tokenizer)
    batch = Seq2SeqCollator(pad_id=0)(list(rows))
    short = min(range(2), key=lambda i: len(rows[i]["labels"]))
    n = len(rows[short]["labels"])
    assert batch["labels"].shape[1] > n
    assert batch["labels"][short, :n].tolist() == rows[short]["labels"]
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()


def test_seq2seq_prompt_mask_equals_attention_mask(t5_tokenizer: Tokenizer, pair: Dataset) -> None:
    batch = Seq2SeqCollator(pad_id=0)(list(seq2seq(pair, t5_tokenizer)))
    assert torch.equal(batch["prompt_mask"], batch["attention_mask"])


def test_tokenised_rows_keep_the_example_id(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    rows = causal(pair, llama_tokenizer)
    assert rows.column_names == ["id", "input_ids", "labels", "prompt_mask"]
    assert rows["id"][:] == ["x-0", "x-1"]


def test_too_short_limits_are_an_error(llama_tokenizer: Tokenizer, pair: Dataset) -> None:
    with pytest.raises(CLScaleError, match="leave no room"):
        causal(pair, llama_tokenizer, source=1)


def counting_encoder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = collators._encode

    def counted(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return real(tokenizer, texts)

    monkeypatch.setattr(collators, "_encode", counted)
    return calls


def test_second_tokenisation_loads_the_cache_instead_of_tokenising(
    llama_tokenizer: Tokenizer, pair: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_encoder(monkeypatch)
    first = causal(pair, llama_tokenizer, cache_dir=tmp_path)
    made = len(calls)
    second = causal(pair, llama_tokenizer, cache_dir=tmp_path)
    assert made > 0 and len(calls) == made
    assert second[:] == first[:]
    assert [f["filename"] for f in second.cache_files] == [str(next(tmp_path.glob("causal-*.arrow")))]


def test_other_settings_do_not_reuse_the_cache(
    llama_tokenizer: Tokenizer, pair: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_encoder(monkeypatch)
    causal(pair, llama_tokenizer, cache_dir=tmp_path)
    made = len(calls)
    causal(pair, llama_tokenizer, source=32, cache_dir=tmp_path)
    assert len(calls) > made
    assert len(list(tmp_path.glob("causal-*.arrow"))) == 2
