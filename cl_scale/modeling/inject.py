"""Replace the target linear layers of a Hugging Face model with `BranchedLinear` wrappers.

Only module attributes are read (names, `in_features`, the weight's dtype and device), never weight
data, so injection also works on a model whose parameters ZeRO-3 has already partitioned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from cl_scale.errors import CLScaleError
from cl_scale.modeling.branched_linear import BranchedLinear
from cl_scale.modeling.context import BranchContext

ModelKind = Literal["causal", "seq2seq"]

_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"causal": ("q_proj", "v_proj"), "seq2seq": ("q", "v")}
_FAMILY_TARGETS: dict[str, tuple[str, ...]] = {"phi3": ("qkv_proj",)}
"""Families whose query and value projections are not separate layers. Phi-3 fuses q, k and v into one
linear layer, so its branch also adapts the keys: one rank-r update of [q; k; v], not rank-r updates of q
and of v (docs/models.md)."""

_CROSS_ATTENTION = "EncDecAttention"
_ENCODER_READING = ("k", "v")
"""Projections of T5 cross-attention that read the encoder output rather than the decoder states."""


def default_targets(kind: ModelKind, model_type: str | None = None) -> list[str]:
    """The attention query and value projections: the published target modules for `kind`, or the fused
    projection holding them for a family that has one (`model_type` as in the model's config)."""
    if kind not in _DEFAULT_TARGETS:
        raise CLScaleError(f"unknown model kind {kind!r}", f"use one of {sorted(_DEFAULT_TARGETS)}")
    return list(_FAMILY_TARGETS.get(model_type or "", _DEFAULT_TARGETS[kind]))


def stream_of(kind: ModelKind, path: str) -> str:
    """Which token stream a target layer reads: "source" (prompt / encoder input) or "target" (decoder input).

    Decoder-only models have one stream. In T5 the encoder reads the source; the decoder reads the
    target, except the keys and values of cross-attention, which are computed from the encoder output.
    """
    if kind == "causal":
        return "source"
    parts = path.split(".")
    if "encoder" in parts:
        return "source"
    if "decoder" in parts:
        is_cross_kv = len(parts) >= 2 and parts[-2] == _CROSS_ATTENTION and parts[-1] in _ENCODER_READING
        return "source" if is_cross_kv else "target"
    raise CLScaleError(
        f"cannot tell whether {path!r} belongs to the encoder or the decoder",
        "target only linear layers inside the encoder or decoder of a T5-style model",
    )


def inject_branches(
    model: nn.Module,
    *,
    kind: ModelKind,
    target_modules: Sequence[str] | None = None,
    rank: int,
    alpha: float,
    dropout: float,
    context: BranchContext,
) -> dict[str, BranchedLinear]:
    """Wrap every `nn.Linear` whose last name component is a target; returns the wrappers by module path."""
    defaults = default_targets(kind, getattr(getattr(model, "config", None), "model_type", None))  # rejects bad kinds
    targets = set(defaults if target_modules is None else target_modules)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = [name for name in linears if name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise CLScaleError(
            f"no linear layer matches target_modules {sorted(targets)}; linear layers here are named "
            f"{', '.join(available[:8])}{' ...' if len(available) > 8 else ''}",
            "set model.target_modules to names from that list (the last component of the module path)",
        )
    branched: dict[str, BranchedLinear] = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = BranchedLinear(
            linears[name], rank=rank, alpha=alpha, dropout=dropout, context=context, stream=stream_of(kind, name)
        )
        setattr(parent, child, layer)
        branched[name] = layer
    return branched
