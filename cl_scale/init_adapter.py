"""`model.init_adapter: PATH`: the first task's branch starts from an existing PEFT LoRA adapter.

The adapter adds s_p B_p A_p to each target layer (s_p = lora_alpha / r, or lora_alpha / sqrt(r) with
rsLoRA). Branch 0 becomes A_0 = A_p and B_0 = (s_p / s) B_p, s the recipe's alpha / rank, so before any
training the continual model computes exactly what PEFT computes with that adapter on the same base.
Only methods whose first task trains A and B from their starting values can use it: a method that
designs A from data (InfLoRA, and GainLoRA on InfLoRA branches) would overwrite the adapter's A.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from cl_scale.distributed import LocalAccess
from cl_scale.errors import CLScaleError, read_json, read_safetensors
from cl_scale.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX

if TYPE_CHECKING:
    from cl_scale.modeling.wrapper import ContinualModel
    from cl_scale.recipe import Recipe

_UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias"}


def start_from_adapter(model: ContinualModel, recipe: Recipe, trainable: Sequence[nn.Parameter]) -> None:
    """Write the recipe's init adapter into branch 0 (grown, with `trainable` the first task's parameters)."""
    folder = Path(str(recipe.model.init_adapter))
    config = _read_config(folder / ADAPTER_CONFIG)
    rank = int(config.get("r", 0))
    if rank != recipe.method.rank:
        raise CLScaleError(
            f"the init adapter {folder} has rank {rank}, the recipe's branches rank {recipe.method.rank}",
            f"set method.rank: {rank}",
        )
    tensors = read_safetensors(
        folder / ADAPTER_WEIGHTS, problem=f"the init adapter's weights {folder / ADAPTER_WEIGHTS} cannot be read",
        fix="save the adapter with PEFT's save_pretrained (safetensors, the default)",
    )
    wanted = {f"{PEFT_PREFIX}{path}.lora_{x}.weight": (path, x) for path in model.branched for x in "AB"}
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    if missing or extra:
        names = sorted({name.rsplit(".", 2)[0].rsplit(".", 1)[-1] for name in tensors})
        raise CLScaleError(
            f"the init adapter {folder} does not cover the recipe's target layers "
            f"(first {'missing' if missing else 'unexpected'} tensor: {(missing or extra)[0]})",
            f"set model.target_modules to the adapter's: {names}",
        )
    peft_scaling = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    trainable_ids = {id(p) for p in trainable}
    params, values = [], []
    for path, layer in model.branched.items():
        a, b = layer.branch(0)
        if id(a) not in trainable_ids:
            raise CLScaleError(
                f"method {recipe.method.name} does not train the first task's A from its starting value "
                "(it designs A from the task's data), so it cannot start from an adapter",
                "drop model.init_adapter, or use a method that trains A (seqlora, inclora, olora, nlora, "
                "or gainlora with method.branch: olora or nlora)",
            )
        a_p, b_p = tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"]
        if tuple(a_p.shape) != tuple(a.shape) or tuple(b_p.shape) != tuple(b.shape):
            raise CLScaleError(
                f"the init adapter's {path} has shapes {tuple(a_p.shape)}, {tuple(b_p.shape)}; the model's "
                f"branch has {tuple(a.shape)}, {tuple(b.shape)}",
                "use an adapter trained on this base model (its base_model_name_or_path)",
            )
        params += [a, b]
        values += [a_p.float(), b_p.float() * (peft_scaling / layer.scaling)]
    LocalAccess().write(params, values)


def _read_config(path: Path) -> dict:
    """The adapter's adapter_config.json, checked to be a plain LoRA adapter."""
    if not path.is_file():
        raise CLScaleError(
            f"model.init_adapter: {path.parent} is not a PEFT adapter folder (no {path.name})",
            "point it to a folder written by PeftModel.save_pretrained",
        )
    config = read_json(path, fix="re-save the adapter with PEFT")
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CLScaleError(f"{path} is not a LoRA adapter config (peft_type must be LORA)", "use a LoRA adapter")
    for key, label in _UNSUPPORTED.items():
        if config.get(key):
            raise CLScaleError(f"the init adapter uses {label}, which cl-scale branches cannot hold",
                               "use a plain LoRA adapter")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("modules_to_save"):
        raise CLScaleError(
            f"the init adapter {path.parent} has per-layer ranks, alphas or fully trained modules",
            "use a plain LoRA adapter with one rank and alpha and no modules_to_save",
        )
    return config
