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


def offloaded(config: dict[str, Any], key: str) -> bool:
    """Whether the config moves `key` ("offload_param", "offload_optimizer") to the CPU or NVMe."""
    section = config.get("zero_optimization", {}).get(key) or {}
    return str(section.get("device", "none")).lower() in ("cpu", "nvme")


def gathers_in_place(config: dict[str, Any], world_size: int) -> bool:
    """Whether a ZeRO-3 gather only points a parameter at its own partition, allocating nothing.

    So it is with a world of one and parameters on the device (DeepSpeed's no-gather path: the partition
    is the whole parameter). Anything that holds a gathered weight then holds the partition, which is
    kept anyway; with several ranks, or parameters offloaded, a gathered weight is a new buffer.
    """
    return world_size == 1 and not offloaded(config, "offload_param")


def build_ds_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this recipe and world size: file, then overrides, then "auto" filled.

    ZeRO-3's `memory_efficient_linear: "auto"` depends on the world: DeepSpeed's replacement for torch's
    linear keeps only a weight's partition between forward and backward, where torch's autograd keeps
    the gathered weight. That saves memory only where a gather allocates (`gathers_in_place`); at a
    world of one it costs 2-6% of a step and saves nothing (SmolLM2-135M: docs/PERFORMANCE.md, section 6).
    """
    path = recipe.deepspeed.config_path()
    raw = merge(read_json(path, fix="fix the JSON syntax of the DeepSpeed config"), dict(recipe.deepspeed.overrides))
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
        "zero_optimization.memory_efficient_linear": not gathers_in_place(raw, world_size),
    }
    return _fill_auto(raw, values)


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when absent)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))
