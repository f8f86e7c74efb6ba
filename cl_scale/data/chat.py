"""Decoder-only rows through the tokenizer's chat template (`data.chat_template`), for instruct models.

The prompt is a user turn followed by the template's generation prompt; the answer is the assistant turn.
Loss falls on the answer and its end-of-turn token (the tokenizer's EOS) only, and `prompt_mask` - what the
gate reads - covers exactly the rendered prompt, the same ids in training and in generation. The answer is
tokenised on its own after the rendered prompt text, so the prompt ids never depend on the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from cl_scale.data.collators import (
    _check_lengths,
    _decoder_prompt_rows,
    _decoder_rows,
    _encode,
    _eos,
    _tokenize,
)
from cl_scale.errors import CLScaleError

if TYPE_CHECKING:
    from cl_scale.recipe import DataConfig


def _render(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str | None = None) -> str:
    turns = [{"role": "user", "content": prompt}]
    if answer is None:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": answer}], tokenize=False)


def _prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_source_length: int) -> tuple[str, str, list[int]]:
    """(user content kept, rendered prompt, its ids). An over-long prompt loses the START of its content,
    never the template's own tokens, so the generation prompt always sits next to the answer."""
    content, content_ids, cut = prompt, _encode(tokenizer, [prompt])[0], 0
    while True:
        text = _render(tokenizer, content)
        ids = _encode(tokenizer, [text])[0]
        excess = len(ids) - max_source_length
        if excess <= 0:
            return content, text, ids
        if cut >= len(content_ids):
            break
        # A cut text may tokenise a little differently once re-rendered: cut further until it fits.
        cut = min(cut + excess, len(content_ids))
        content = tokenizer.decode(content_ids[cut:])
    raise CLScaleError(
        f"data.max_source_length {max_source_length} leaves no room for a prompt inside the chat template's turn",
        "raise data.max_source_length, or set data.chat_template=false",
    )


def _answer(tokenizer: PreTrainedTokenizerBase, content: str, text: str, answer: str, max_target_length: int) -> list[int]:
    """The assistant turn after the rendered prompt `text`, cut after its end-of-turn token (EOS is kept
    when the answer is cut); what a template writes after the end of turn (a newline) is not learnt."""
    eos = _eos(tokenizer)
    full = _render(tokenizer, content, answer)
    if not full.startswith(text):
        raise CLScaleError(
            "the tokenizer's chat template writes the user turn differently once an assistant turn follows",
            "use a template whose generation prompt starts the assistant turn, or set data.chat_template=false",
        )
    rest = _encode(tokenizer, [full[len(text) :]])[0]
    if eos not in rest:
        raise CLScaleError(
            f"the chat template's assistant turn does not end with the tokenizer's EOS token {tokenizer.eos_token!r}, "
            "so generation would not stop at the end of the turn",
            "set the tokenizer's eos_token to the template's end-of-turn token (e.g. <|im_end|> or <|eot_id|>)",
        )
    body = rest[: rest.index(eos)]
    return body[: max_target_length - 1] + [eos]


def _chat_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int,
    chat_template: str,
) -> dict:
    def pair(prompt_text: str, target: str) -> tuple[list[int], list[int]]:
        content, text, prompt = _prompt(tokenizer, prompt_text, max_source_length)
        return prompt, _answer(tokenizer, content, text, target, max_target_length)

    return _decoder_rows(pair(prompt_text, target) for prompt_text, target in zip(batch["prompt"], batch["target"]))


def _chat_prompt_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_source_length: int, chat_template: str
) -> dict:
    return _decoder_prompt_rows([_prompt(tokenizer, p, max_source_length)[2] for p in batch["prompt"]])


def _template(tokenizer: PreTrainedTokenizerBase) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise CLScaleError(
            f"data.chat_template is true but the tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) "
            "has no chat template",
            "use an instruct model's tokenizer (its tokenizer_config.json has chat_template), or data.chat_template=false",
        )
    return template


def tokenize_chat(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_source_length: int,
    max_target_length: int,
    prompts_only: bool,
    cache_dir: Path | None = None,
) -> Dataset:
    """Training rows (input_ids, labels, prompt_mask) or, with prompts_only, generation rows (no labels).

    The template text is part of the cache key, so a changed template is tokenised again.
    """
    _check_lengths(max_source_length, None if prompts_only else max_target_length)
    kwargs = {"tokenizer": tokenizer, "max_source_length": max_source_length, "chat_template": _template(tokenizer)}
    if prompts_only:
        return _tokenize(ds, "chat-prompts", _chat_prompt_batch, kwargs, cache_dir)
    return _tokenize(ds, "chat", _chat_batch, {**kwargs, "max_target_length": max_target_length}, cache_dir)


def check_chat_template(tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig) -> None:
    """Before a run directory exists: with data.chat_template on, `tokenizer` must have a template whose
    assistant turn ends with its EOS (one probe example through the same code training uses)."""
    _template(tokenizer)
    content, text, _ = _prompt(tokenizer, "probe", data_cfg.max_source_length)
    _answer(tokenizer, content, text, "probe", data_cfg.max_target_length)
