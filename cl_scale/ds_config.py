"""Turn a ds_configs/ file plus the recipe into the concrete DeepSpeed config dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cl_scale.errors import CLScaleError, read_json

if TYPE_CHECKING:
    from cl_scale.recipe import Recipe

def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of `extra` win."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def batch_layout(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps that make `global_batch` from `world_size` ranks, or a clear error."""
    per_step = per_device_batch * world_size
    if global_batch % per_step:
        raise CLScaleError(
            f"train.global_batch={global_batch} is not a multiple of train.per_device_batch={per_device_batch} "
            f"x world size {world_size} = {per_step}",
            f"choose a global batch divisible by {per_step}, or change train.per_device_batch",
        )
    return global_batch // per_step


def _fill_auto(node: Any, values: dict[str, Any], path: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise CLScaleError(
                f"DeepSpeed config field '{path}' is \"auto\" but cl-scale has no recipe value for it",
                "give it a concrete value in the JSON file or in deepspeed.overrides",
            )
        return values[path]
    return node


def build_ds_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this recipe and world size: file, then "auto" filled, then overrides."""
    path = recipe.deepspeed.config_path()
    raw = read_json(path, fix="fix the JSON syntax of the DeepSpeed config")
    train = recipe.train
    accumulation = batch_layout(train.global_batch, train.per_device_batch, world_size)
    dtype = recipe.model.dtype
    values = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.per_device_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "bf16.enabled": dtype == "bf16",
        "fp16.enabled": dtype == "fp16",
    }
    config = merge(_fill_auto(raw, values), dict(recipe.deepspeed.overrides))
    return config


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when absent)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))
