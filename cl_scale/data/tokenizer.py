"""Small sentencepiece tokenizers trained on the fly, wrapped as Llama- or T5-style HF tokenizers.

Tests and the demo's tiny models need a real tokenizer without downloads. transformers 5 keeps only
`tokenizers`-backed classes and reads a sentencepiece file through protobuf, so the wrapper is built from
the trained pieces directly (vocab + merges for Llama's BPE, pieces + scores for T5's unigram).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import sentencepiece as spm
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, T5Tokenizer
from transformers.tokenization_utils_base import generate_merges

from cl_scale.errors import CLScaleError

_COMMON = {
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "hard_vocab_limit": False,
    "max_sentence_length": 1 << 16,
    "num_threads": 1,
    "minloglevel": 2,
}
# Llama: unk 0, bos 1, eos 2, plus a pad token (Llama-2 itself has none); bytes cover unseen characters.
_CAUSAL = {"model_type": "bpe", "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3, "byte_fallback": True}
# T5: pad 0, eos 1, unk 2, no bos.
_SEQ2SEQ = {"model_type": "unigram", "pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}


def _train(texts: list[str], vocab_size: int, options: dict) -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, **_COMMON, **options
        )
    except RuntimeError as err:
        problem = f"sentencepiece could not train a tokenizer: {err}"
        raise CLScaleError(problem, "raise vocab_size or give more text") from err
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _llama(sp: spm.SentencePieceProcessor) -> PreTrainedTokenizerBase:
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def _t5(sp: spm.SentencePieceProcessor) -> PreTrainedTokenizerBase:
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def train_sentencepiece_tokenizer(
    texts: Iterable[str], out_dir: Path, *, vocab_size: int, kind: Literal["causal", "seq2seq"]
) -> PreTrainedTokenizerBase:
    """Train on `texts`, save to `out_dir` (loadable with AutoTokenizer.from_pretrained) and return it.

    "causal" gives a Llama-style BPE with byte fallback (every character encodes, newlines included);
    "seq2seq" a T5-style unigram that, like T5, splits on whitespace and so drops newlines: its training
    texts are whitespace-normalised the same way so no piece is learnt that could never be used.
    The vocabulary may come out smaller than `vocab_size` when the texts are small.
    """
    if kind == "causal":
        tokenizer = _llama(_train(list(texts), vocab_size, _CAUSAL))
    elif kind == "seq2seq":
        tokenizer = _t5(_train([" ".join(t.split()) for t in texts], vocab_size, _SEQ2SEQ))
    else:
        raise CLScaleError(f"unknown tokenizer kind {kind!r}", "use 'causal' or 'seq2seq'")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
