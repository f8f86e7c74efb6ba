"""Load a `cl-scale export --format gated` folder back into a model that answers like `cl-scale generate`.

Needs the folder and the base model it names (its recipe's model.path, or `base=`), not the run directory
and no DeepSpeed engine or process group: the per-task PEFT adapters become the branches, the gate bank
its gates, in task order, on one device.
"""

from __future__ import annotations

from pathlib import Path

from cl_scale.continual_state import build_state
from cl_scale.distributed import LocalAccess
from cl_scale.errors import CLScaleError, read_format_json, read_safetensors
from cl_scale.export import ADAPTER_WEIGHTS, GATED_CONFIG, GATED_FORMAT, PEFT_PREFIX
from cl_scale.local_stage import LocalStage, on_device
from cl_scale.recipe import load_recipe


def load_exported(folder: str | Path, base: str | None = None) -> LocalStage:
    """The gated model exported to `folder`, on this process's device; `base` replaces the base model path."""
    folder = Path(folder)
    config_path = folder / GATED_CONFIG
    config = read_format_json(
        config_path, GATED_FORMAT,
        missing=CLScaleError(
            f"{folder} is not a gated cl-scale export (no {GATED_CONFIG})",
            "point to a folder written by `cl-scale export RUN --format gated`",
        ),
        fix="the export is damaged: export the run again",
        other=lambda _: CLScaleError(
            f"{config_path} is not a {GATED_FORMAT} config", "export the run again with this cl-scale"
        ),
    )
    recipe = load_recipe(folder / config["recipe"])
    if base is not None:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": base})})
    tasks = list(config["tasks"])
    state = build_state(recipe, None, len(tasks))
    model = state.model
    problem, fix = f"the export in {folder} cannot be read", "export the run again"
    adapters = [
        read_safetensors(folder / name / ADAPTER_WEIGHTS, problem=problem, fix=fix) for name in config["adapters"]
    ]
    gates = read_safetensors(folder / config["gates"], problem=problem, fix=fix)
    params, values = [], []
    for index, tensors in enumerate(adapters):
        model.add_branches()
        model.add_gate()
        for path, layer in model.branched.items():
            a, b = layer.branch(index)
            params += [a, b]
            values += [_tensor(tensors, f"{PEFT_PREFIX}{path}.lora_{x}.weight", folder) for x in "AB"]
    for name, param in model.gates.named_parameters():
        params.append(param)
        values.append(_tensor(gates, name, folder))
    shapes = [(p, v) for p, v in zip(params, values) if tuple(p.shape) != tuple(v.shape)]
    if shapes:
        raise CLScaleError(
            f"the export in {folder} does not match the base model (a tensor of shape {tuple(shapes[0][1].shape)} "
            f"where the model has {tuple(shapes[0][0].shape)})",
            "load it on the base model it was exported from (base=...)",
        )
    LocalAccess().write(params, values)
    return LocalStage(recipe, tasks, state.tokenizer, state.kind, on_device(model))


def _tensor(tensors: dict, name: str, folder: Path) -> object:
    if name not in tensors:
        raise CLScaleError(f"the export in {folder} lacks tensor {name}", "export the run again")
    return tensors[name]
