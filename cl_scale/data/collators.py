"""Examples to model batches: tokenisation (cached on disk by content) and padding collators.

Columns produced: decoder-only `input_ids`, `labels` (-100 where no loss), `prompt_mask` (1 on real prompt
tokens; the gate reads the prompt through it); seq2seq `input_ids` (source) and `labels` (target). The `id`
column is kept so predictions can be matched back; collators ignore it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from cl_scale.errors import CLScaleError

IGNORE_INDEX = -100
# Bump when the token layout below changes, so old cache files are not reused.
_LAYOUT_VERSION = "2"


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; every special token is placed explicitly by the callers."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _check_lengths(max_source_length: int, max_target_length: int | None) -> None:
    if max_source_length < 2 or (max_target_length is not None and max_target_length < 1):
        raise CLScaleError(
            f"max_source_length {max_source_length} / max_target_length {max_target_length} leave no room",
            "use max_source_length >= 2 and max_target_length >= 1",
        )


def _eos(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise CLScaleError("the tokenizer has no EOS token", "use a tokenizer with an eos_token; answers must end")
    return tokenizer.eos_token_id


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] when the tokenizer itself starts a text with it, else []. Some define a BOS they never add
    (SmolLM2's is <|im_start|>, the chat-turn opener): prepending it would put every prompt in a chat turn."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []


def _split_space(prompt: str, space_in_answer: bool) -> tuple[str, str]:
    """(the prompt's text as tokenised, the text the answer's tokens start with).

    With `space_in_answer` the prompt's trailing whitespace ("Output: ") is tokenised with the answer, so
    the answer starts with a word and its leading space, as byte-level BPE and SentencePiece tokenizers
    saw it in pre-training, instead of a lone space token; prompt + answer is the same text either way."""
    if not space_in_answer:
        return prompt, ""
    head = prompt.rstrip()
    return head, prompt[len(head) :]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], space_in_answer: bool) -> list[list[int]]:
    return _encode(tokenizer, [_split_space(p, space_in_answer)[0] for p in prompts])


def _answer_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], prompt_ids: list[list[int]], answers: list[str],
    space_in_answer: bool,
) -> list[list[int]]:
    """The answers' ids as they follow their prompts. With `space_in_answer` they are read off the whole
    text tokenised at once where it starts with the prompt's ids (so a tokenizer that marks word starts,
    like SentencePiece, gives the answer's first word its usual token), else tokenised with the space."""
    if not space_in_answer:
        return _encode(tokenizer, answers)
    wholes = _encode(tokenizer, [p + a for p, a in zip(prompts, answers)])
    return [
        whole[len(ids) :] if whole[: len(ids)] == ids else _encode(tokenizer, [_split_space(p, True)[1] + a])[0]
        for whole, ids, p, a in zip(wholes, prompt_ids, prompts, answers)
    ]


def _causal_prompt(bos: list[int], prompt: list[int], max_source_length: int) -> list[int]:
    """`bos` + the END of the prompt, so "Output: " always survives truncation."""
    keep = max_source_length - len(bos)
    return bos + prompt[max(0, len(prompt) - keep) :]


def _decoder_rows(pairs: Iterable[tuple[list[int], list[int]]]) -> dict[str, list]:
    """Decoder-only training rows from (prompt ids, answer ids): prompt + answer, the loss on the answer only."""
    rows: dict[str, list] = {"input_ids": [], "labels": [], "prompt_mask": []}
    for prompt, answer in pairs:
        rows["input_ids"].append(prompt + answer)
        rows["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
        rows["prompt_mask"].append([1] * len(prompt) + [0] * len(answer))
    return rows


def _decoder_prompt_rows(prompts: list[list[int]]) -> dict[str, list]:
    """Decoder-only generation rows: the prompts' ids alone, all prompt."""
    return {"input_ids": prompts, "prompt_mask": [[1] * len(p) for p in prompts]}


def _causal_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int,
    space_in_answer: bool,
) -> dict:
    eos, bos = _eos(tokenizer), _bos(tokenizer)
    prompts = _prompt_ids(tokenizer, batch["prompt"], space_in_answer)
    answers = _answer_ids(tokenizer, batch["prompt"], prompts, batch["target"], space_in_answer)
    return _decoder_rows(
        (_causal_prompt(bos, prompt, max_source_length), answer[: max_target_length - 1] + [eos])
        for prompt, answer in zip(prompts, answers)
    )


def _causal_prompt_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_source_length: int, space_in_answer: bool
) -> dict:
    bos = _bos(tokenizer)
    ids = _prompt_ids(tokenizer, batch["prompt"], space_in_answer)
    return _decoder_prompt_rows([_causal_prompt(bos, p, max_source_length) for p in ids])


def _seq2seq_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int
) -> dict:
    eos = _eos(tokenizer)
    sources = [s[: max_source_length - 1] + [eos] for s in _encode(tokenizer, batch["prompt"])]
    targets = [t[: max_target_length - 1] + [eos] for t in _encode(tokenizer, batch["target"])]
    return {"input_ids": sources, "labels": targets}


def _tokenize(ds: Dataset, layout: str, function: Callable, kwargs: dict, cache_dir: Path | None) -> Dataset:
    """Map `function` over ds; with a cache_dir the result is a file named by a hash of the content,
    the tokenizer and the settings, so a second run loads it instead of tokenising again."""
    drop = [c for c in ds.column_names if c != "id"]
    if cache_dir is None:
        return ds.map(function, batched=True, fn_kwargs=kwargs, remove_columns=drop)
    content = {c: ds[c][:] for c in ("id", "prompt", "target") if c in ds.column_names}
    settings = {k: v for k, v in kwargs.items() if k != "tokenizer"}
    fingerprint = Hasher.hash((_LAYOUT_VERSION, layout, content, kwargs["tokenizer"], settings))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return ds.map(
        function,
        batched=True,
        fn_kwargs=kwargs,
        remove_columns=drop,
        new_fingerprint=fingerprint,
        cache_file_name=str(Path(cache_dir) / f"{layout}-{fingerprint}.arrow"),
        load_from_cache_file=True,
    )


def tokenize_causal(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_source_length: int,
    max_target_length: int,
    space_in_answer: bool = False,
    cache_dir: Path | None = None,
) -> Dataset:
    """Training rows for a decoder-only model: [BOS] prompt + answer + EOS, loss on answer and EOS only.
    BOS only where the tokenizer adds one itself.

    An over-long prompt is truncated FROM THE LEFT to max_source_length tokens (BOS included), keeping
    its end ("Output: ") next to the answer. The answer is cut only by max_target_length (EOS included,
    EOS always kept). The prompt's ids are exactly those generation is given; `space_in_answer` moves the
    prompt's trailing whitespace to the answer's side of the boundary (`data.trailing_space`).
    """
    _check_lengths(max_source_length, max_target_length)
    kwargs = {
        "tokenizer": tokenizer, "max_source_length": max_source_length, "max_target_length": max_target_length,
        "space_in_answer": space_in_answer,
    }
    return _tokenize(ds, "causal", _causal_batch, kwargs, cache_dir)


def tokenize_causal_prompts(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, *, max_source_length: int, space_in_answer: bool = False,
    cache_dir: Path | None = None,
) -> Dataset:
    """Prompt-only rows for generation, truncated and split from the answer like `tokenize_causal`; no labels."""
    _check_lengths(max_source_length, None)
    kwargs = {"tokenizer": tokenizer, "max_source_length": max_source_length, "space_in_answer": space_in_answer}
    return _tokenize(ds, "causal-prompts", _causal_prompt_batch, kwargs, cache_dir)


def tokenize_seq2seq(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_source_length: int,
    max_target_length: int,
    cache_dir: Path | None = None,
) -> Dataset:
    """Rows for an encoder-decoder: source = prompt + EOS, labels = target + EOS.

    The source is cut from the right at max_source_length (EOS kept), as the published T5 runs did;
    the decoder starts fresh, so the "Output:" cue matters less than for a decoder-only model.
    """
    _check_lengths(max_source_length, max_target_length)
    kwargs = {"tokenizer": tokenizer, "max_source_length": max_source_length, "max_target_length": max_target_length}
    return _tokenize(ds, "seq2seq", _seq2seq_batch, kwargs, cache_dir)


def _pad(rows: list[list[int]], value: int, width: int, left: bool) -> torch.Tensor:
    padded = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def _labelled(row: list[int]) -> int:
    return sum(token != IGNORE_INDEX for token in row)


def _collate(features: list[dict[str, Any]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    ids = [f["input_ids"] for f in features]
    width = max(len(r) for r in ids)
    batch = {
        "input_ids": _pad(ids, pad_id, width, left),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0, width, left),
    }
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        batch["labels"] = _pad(labels, IGNORE_INDEX, max(len(r) for r in labels), left)
    return batch


class CausalCollator:
    """Pads on the LEFT (generation appends on the right): input_ids, attention_mask, prompt_mask
    (0 on padding and answer), and labels (-100 on padding) when the rows have them."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _collate(features, self.pad_id, left=True)
        width = batch["input_ids"].shape[1]
        batch["prompt_mask"] = _pad([f["prompt_mask"] for f in features], 0, width, left=True)
        return batch

    @staticmethod
    def loss_tokens(labels: list[list[int]]) -> int:
        """The tokens a causal LM's loss averages over in the batch of these label rows: the labelled ones,
        except in column 0, which the loss's shift leaves without a prediction (a row fills it only when
        it is the longest and its first token is labelled)."""
        width = max(len(row) for row in labels)
        return sum(_labelled(row) - (len(row) == width and row[0] != IGNORE_INDEX) for row in labels)


class Seq2SeqCollator:
    """Pads on the right: input_ids, attention_mask, prompt_mask (= attention_mask of the source),
    labels padded with -100."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _collate(features, self.pad_id, left=False)
        batch["prompt_mask"] = batch["attention_mask"].clone()
        return batch

    @staticmethod
    def loss_tokens(labels: list[list[int]]) -> int:
        """The tokens an encoder-decoder's loss averages over in the batch of these label rows."""
        return sum(_labelled(row) for row in labels)
