"""What the built-in tiny models are, without torch: the recipe checks their names when it loads."""

from __future__ import annotations

from dataclasses import dataclass

BUILTIN_PREFIX = "builtin:"
"""`model.path` of a built-in model is this prefix and its name."""


@dataclass(frozen=True)
class BuiltinSpec:
    """How a built-in model is made; bump `version` whenever any of it changes."""

    kind: str
    version: int
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny-llama": BuiltinSpec("causal", 3, 400, 128, 4, 4, 1500, 16, 3e-3),
    "tiny-t5": BuiltinSpec("seq2seq", 2, 400, 128, 3, 4, 1500, 16, 3e-3),
}
