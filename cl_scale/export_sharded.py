"""`cl-scale export --format merged` for a model that only fits sharded: merge and write module by module.

Run under the launcher (`deepspeed --num_gpus N $(which cl-scale) export RUN --out DIR --format merged`).
The base loads partitioned by ZeRO-3 exactly as `cl-scale eval` loads it, the stage's branches are restored,
and then every rank walks the modules in the same order: each module's own parameters are gathered (one
module at a time), rank 0 folds a branched weight's W + s Σ B_i A_i in float32, copies the values to the CPU
and the gathered module is released before the next one. Rank 0 writes a safetensors shard whenever the
shard limit is reached, then the shard index, config, generation config and tokenizer, the same layout
`save_pretrained` writes, loadable by plain transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from cl_scale import distributed as dist_utils
from cl_scale.continual_state import build_state, inference_ds_config, open_run_recipe, resolve_stage, restore_stage
from cl_scale.errors import CLScaleError
from cl_scale.evaluation.gates import is_gated
from cl_scale.export import check_destination, gated_refusal, staged
from cl_scale.modeling.branched_linear import BranchedLinear

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"


def merged_tensors(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Each module's merged state (its direct parameters and persistent buffers), on rank 0; collective.

    Yields one dict per module (empty on other ranks), with the names the plain model has: a branched
    layer's frozen linear appears under the layer's own path and its branches do not appear.
    """
    from deepspeed import zero

    base = model.base
    owners = {id(layer.base): (path, layer) for path, layer in model.branched.items()}
    seen: set[int] = set()
    for name, module in base.named_modules():
        if isinstance(module, BranchedLinear):
            continue  # its branches are folded in when its frozen linear is visited
        path, layer = owners.get(id(module), (name, None))
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        buffers = [(n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        if not params and not buffers:
            continue
        out: dict[str, torch.Tensor] = {}
        # the branches too: they are plain tensors when the base alone was partitioned at load, but a
        # model inside an engine holds them as partitions as well (gathering plain tensors costs nothing)
        branches = [] if layer is None else [t for pair in layer.branches() for t in pair]
        with zero.GatheredParameters([*(p for _, p in params), *branches]):
            if dist_utils.is_main():
                for n, p in [*params, *buffers]:
                    value = p.detach()
                    if layer is not None and n == "weight" and layer.num_branches:
                        a = torch.cat([x.detach().float() for x, _ in layer.branches()], dim=0).to(value.device)
                        b = torch.cat([y.detach().float() for _, y in layer.branches()], dim=1).to(value.device)
                        value = (value.float() + layer.scaling * (b @ a)).to(p.dtype)
                    out[f"{path}.{n}" if path else n] = value.cpu().clone().contiguous()
        yield out


def write_sharded(model: nn.Module, tokenizer: object | None, folder: Path, max_shard_bytes: int) -> None:
    """Write the merged model to `folder` (rank 0) as safetensors shards of at most `max_shard_bytes`.

    `tokenizer` is saved beside it (None: weights and configs only, as the memory benchmark writes).
    """
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[Path] = []

    def flush() -> None:
        files.append(folder / f".shard-{len(files):05d}.safetensors")
        save_file(shards[0], str(files[-1]), metadata={"format": "pt"})
        shards[0], sizes[0] = {}, 0

    weight_map: dict[str, int] = {}
    total = 0
    for tensors in merged_tensors(model):
        for name, value in tensors.items():
            nbytes = value.numel() * value.element_size()
            if shards[0] and sizes[0] + nbytes > max_shard_bytes:
                flush()
            shards[0][name] = value
            sizes[0] += nbytes
            weight_map[name] = len(files)
            total += nbytes
    if not dist_utils.is_main():
        return
    flush()
    if len(files) == 1:
        files[0].rename(folder / SINGLE_WEIGHTS)
    else:
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        for path, final in zip(files, names):
            path.rename(folder / final)
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    model.base.config.save_pretrained(folder)
    model.base.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def export_merged_sharded(
    run_dir: Path, out: Path, *, stage: int | None, force: bool, max_shard_bytes: int
) -> int | None:
    """The sharded `merged` export on every rank of this launch; the 1-based stage written on rank 0, else None."""
    run, recipe = open_run_recipe(run_dir)
    with dist_utils.process_group(recipe.train.collective_timeout_s):
        index = resolve_stage(run, stage)
        dist_utils.run_on_main(check_destination, out, force)
        state = build_state(recipe, inference_ds_config(recipe, dist_utils.world_size()), len(run.tasks))
        restore_stage(state, recipe, run.stage_dir(index), index)
        if is_gated(state.model):
            raise gated_refusal("merged")
        state.model.requires_grad_(False)
        if dist_utils.is_main():
            with staged(out) as tmp:
                write_sharded(state.model, state.tokenizer, tmp, max_shard_bytes)
        else:
            write_sharded(state.model, state.tokenizer, out, max_shard_bytes)
        dist_utils.barrier()
        main = dist_utils.is_main()
    return index + 1 if main else None


def shard_bytes(megabytes: int) -> int:
    """`--shard-mb` in bytes, checked."""
    if megabytes < 1:
        raise CLScaleError(f"--shard-mb must be at least 1, not {megabytes}", "e.g. --shard-mb 5000")
    return megabytes * 1024 * 1024
