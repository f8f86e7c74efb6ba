"""`cl-scale export`: a finished stage's model in the formats serving stacks read.

With every coefficient equal to 1 (all methods but GainLoRA) a branched layer after stage K computes

    y = W x + s [B_1 ... B_K] [A_1; ...; A_K] x

which is one LoRA adapter of rank K r with PEFT's scaling lora_alpha / (K r) = s, i.e. lora_alpha = s K r
(`peft`), or the plain weight W + s sum_i B_i A_i (`merged`). GainLoRA scales each task's branch by a
coefficient its gate computes from the prompt, so no fixed adapter equals it: `gated` writes the per-task
adapters, the gate bank and what `cl_scale.load_exported` needs to rebuild the model exactly.

Every format is assembled in a hidden folder beside the destination and renamed into place, so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_scale.distributed import launcher_environment
from cl_scale.errors import CLScaleError
from cl_scale.evaluation.gates import is_gated
from cl_scale.local_stage import LocalStage, load_run
from cl_scale.modeling.loading import model_dir
from cl_scale.recipe import recipe_to_yaml
from cl_scale.rundir import stage_name

FORMATS = {
    "peft": "one standard PEFT LoRA adapter holding every task's branch (rank K·r), for PeftModel.from_pretrained, "
    "vLLM --enable-lora, TGI/LoRAX; --per-task writes each task's branch as its own adapter instead. "
    "Methods without gates only.",
    "merged": "the base model with every branch folded into its weights (W + s·Σ B_i A_i), saved with "
    "save_pretrained with the tokenizer beside it: loads with plain transformers. Methods without gates only.",
    "gated": "GainLoRA: the per-task PEFT adapters, the gate bank (safetensors) and a JSON config; load with "
    "cl_scale.load_exported(DIR), or serve on an engine as docs/export.md describes.",
}
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module path of the base in its saved tensor names."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GATED_FORMAT = "cl-scale-gated/1"
GATED_CONFIG = "cl_scale_gated.json"
GATES = "gates.safetensors"
RECIPE = "recipe.yaml"
ADAPTERS = "adapters"
TOKENIZER = "tokenizer"
MAX_SHARD_MB = 500
"""Default largest safetensors shard of a merged export, in MB (`--shard-mb`): under the launcher rank 0
holds the shard it is filling beside its partition, so it is kept small (bench/export_7b_shape.py)."""
_TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


@dataclass
class Exported:
    """What an export wrote: where, in which format, from which stage, and the largest adapter rank."""

    path: Path
    fmt: str
    stage: int
    max_lora_rank: int | None
    """Rank of the largest adapter written (vLLM's --max-lora-rank must be at least this); None for merged."""


def export_run(
    run_dir: Path, out: Path, *, stage: int | None = None, fmt: str = "peft", per_task: bool = False,
    force: bool = False, shard_mb: int = MAX_SHARD_MB,
) -> Exported:
    """Write stage `stage` (1-based; default the last finished) of a run to `out` in format `fmt`."""
    check_options(fmt, per_task)
    check_destination(out, force)
    loaded = load_run(run_dir, stage)
    _check_fits(loaded, fmt, per_task)
    with staged(out) as tmp:
        if fmt == "merged":
            write_merged(loaded, tmp, shard_mb)
            rank = None
        elif fmt == "gated":
            rank = write_gated(loaded, tmp)
        elif per_task:
            rank = max(write_adapter(loaded, [i], tmp / name) for i, name in enumerate(_adapter_names(loaded)))
        else:
            rank = write_adapter(loaded, list(range(loaded.model.num_branches)), tmp)
    return Exported(out, fmt, loaded.stage, rank)


def check_options(fmt: str, per_task: bool) -> None:
    """Refuse an unknown format, and --per-task with a format it does not apply to."""
    if fmt not in FORMATS:
        raise CLScaleError(f"unknown export format {fmt!r}", f"use --format {' or '.join(FORMATS)}")
    if per_task and fmt != "peft":
        raise CLScaleError(f"--per-task applies to --format peft, not {fmt}", "drop --per-task")


def check_destination(out: Path, force: bool) -> None:
    """Refuse a destination that is a file, or a non-empty folder unless `force`."""
    if out.exists() and not out.is_dir():
        raise CLScaleError(f"export destination {out} is a file", "give --out a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CLScaleError(f"export destination {out} is not empty", "choose another --out, or add --force to replace it")


def _check_fits(loaded: LocalStage, fmt: str, per_task: bool) -> None:
    """Refuse a format that cannot represent the stage's model."""
    gated = is_gated(loaded.model)
    if gated and fmt != "gated":
        raise gated_refusal(fmt)
    if not gated and fmt == "gated":
        raise CLScaleError(
            "--format gated needs a GainLoRA run; this run's method has no gates",
            "use --format peft (or merged): every branch has coefficient 1, so one adapter is exact",
        )
    if per_task and loaded.model.num_branches != loaded.stage:
        raise CLScaleError(
            f"--per-task needs one branch per task, but this method keeps {loaded.model.num_branches} branch(es) "
            f"for {loaded.stage} task(s) (SeqLoRA retrains one shared branch)",
            "drop --per-task: the single adapter is the whole model",
        )


def gated_refusal(fmt: str) -> CLScaleError:
    """Why `peft` and `merged` cannot hold a GainLoRA model, and what to use instead."""
    return CLScaleError(
        f"--format {fmt} cannot represent a gated model: GainLoRA scales each task's branch by a coefficient "
        "its gate computes from the prompt, so no single fixed adapter or merged weight equals it",
        "use --format gated (per-task adapters plus the gate bank; see docs/export.md for serving it)",
    )


def _adapter_names(loaded: LocalStage) -> list[str]:
    """Folder name of each task's adapter, numbered like the run's stages."""
    return [stage_name(i, task) for i, task in enumerate(loaded.tasks)]


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden temporary folder beside `out`, renamed to `out` on success (replacing it), removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; exports are meant to be shared
    try:
        yield tmp
        _share(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _share(folder: Path) -> None:
    """Make everything in `folder` readable by all (safetensors writes its files 0600)."""
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _layer_scaling(loaded: LocalStage) -> tuple[int, float]:
    """(r, s) of the branched layers (the same for every layer)."""
    layer = next(iter(loaded.model.branched.values()))
    return layer.rank, layer.scaling


def adapter_tensors(loaded: LocalStage, branches: Sequence[int]) -> dict[str, torch.Tensor]:
    """PEFT-named A and B of one adapter made of `branches` stacked: A rows and B columns in branch order."""
    tensors = {}
    for path, layer in loaded.model.branched.items():
        pairs = [layer.branch(i) for i in branches]
        a = torch.cat([a.detach() for a, _ in pairs], dim=0)
        b = torch.cat([b.detach() for _, b in pairs], dim=1)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.cpu().contiguous()
    return tensors


def write_adapter(loaded: LocalStage, branches: Sequence[int], folder: Path) -> int:
    """Write `branches` as one PEFT LoRA adapter in `folder`; returns its rank."""
    from safetensors.torch import save_file

    rank, scaling = _layer_scaling(loaded)
    total = rank * len(branches)
    alpha = scaling * total
    config = {
        "peft_type": "LORA",
        "task_type": _TASK_TYPES[loaded.kind],
        "base_model_name_or_path": model_dir(loaded.recipe.model),
        "r": total,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path in loaded.model.branched}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(loaded, branches), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return total


def merge_branches(loaded: LocalStage) -> None:
    """Fold every branch into its frozen weight (W + s B A, in float32) and put the plain linear back."""
    with torch.no_grad():
        for path, layer in loaded.model.branched.items():
            linear = layer.base
            if layer.num_branches:
                a = torch.cat([a.float() for a, _ in layer.branches()], dim=0)
                b = torch.cat([b.float() for _, b in layer.branches()], dim=1)
                merged = linear.weight.float() + layer.scaling * (b @ a)
                linear.weight.copy_(merged.to(linear.weight.dtype))
            parent, _, child = path.rpartition(".")
            setattr(loaded.model.base.get_submodule(parent), child, linear)


def write_merged(loaded: LocalStage, folder: Path, shard_mb: int = MAX_SHARD_MB) -> None:
    """The base with the branches merged in, as a plain transformers checkpoint with its tokenizer."""
    merge_branches(loaded)
    loaded.model.base.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    loaded.tokenizer.save_pretrained(folder)


def write_gated(loaded: LocalStage, folder: Path) -> int:
    """Per-task adapters, the gate bank, the tokenizer, the run's recipe and the JSON config; returns r."""
    from safetensors.torch import save_file

    gates = loaded.model.gates
    assert gates is not None  # _check_fits refused ungated models
    names = _adapter_names(loaded)
    rank = max(write_adapter(loaded, [i], folder / ADAPTERS / name) for i, name in enumerate(names))
    tensors = {name: p.detach().cpu().contiguous() for name, p in gates.named_parameters()}
    save_file(tensors, str(folder / GATES), metadata={"format": "pt"})
    loaded.tokenizer.save_pretrained(folder / TOKENIZER)
    (folder / RECIPE).write_text(recipe_to_yaml(loaded.recipe))
    _, scaling = _layer_scaling(loaded)
    config = {
        "format": GATED_FORMAT,
        "kind": loaded.kind,
        "tasks": loaded.tasks,
        "adapters": [f"{ADAPTERS}/{name}" for name in names],
        "gates": GATES,
        "gate": {"d_model": gates.d_model, "hidden": gates.hidden, "num_gates": gates.num_gates},
        "rank": rank,
        "scaling": scaling,
        "recipe": RECIPE,
        "tokenizer": TOKENIZER,
        "combine": "y = W x + sum_i a_i(prompt) * s * B_i A_i x, a_i = |2 sigmoid(4 cos(g_i(xbar), k_i)) - 1|",
    }
    (folder / GATED_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return rank


def launched_ranks() -> int:
    """Ranks the launcher started (deepspeed, torchrun or srun; 1 for a plain process)."""
    import os

    return int({**os.environ, **launcher_environment(dict(os.environ))}["WORLD_SIZE"])


def export_cli(
    run_dir: Path, out: Path, *, stage: int | None, fmt: str, per_task: bool, force: bool, shard_mb: int | None
) -> None:
    """`cl-scale export`: write the export and say what was written and how to serve it."""
    shard_mb = MAX_SHARD_MB if shard_mb is None else shard_mb
    import contextlib
    import sys

    from rich.console import Console

    # Here, not at the top: export_sharded imports this module's helpers (an import cycle otherwise).
    from cl_scale.export_sharded import export_merged_sharded, shard_bytes

    check_options(fmt, per_task)
    sharded = launched_ranks() > 1
    if sharded and fmt != "merged":
        raise CLScaleError(
            f"--format {fmt} is written by one process (the branches and gates are small)",
            "run it without the launcher; only --format merged runs on several ranks, for a model that needs them",
        )
    with contextlib.redirect_stdout(sys.stderr):  # library chatter stays off stdout
        if sharded:
            number = export_merged_sharded(run_dir, out, stage=stage, force=force, max_shard_bytes=shard_bytes(shard_mb))
            if number is None:
                return  # rank 0 reports
            done = Exported(out, fmt, number, None)
        else:
            done = export_run(run_dir, out, stage=stage, fmt=fmt, per_task=per_task, force=force, shard_mb=shard_mb)
    console = Console()
    console.print(f"exported stage {done.stage} of {run_dir} as {done.fmt} to {done.path}")
    if done.max_lora_rank is not None:
        console.print(
            f"adapter rank {done.max_lora_rank}: serving with vLLM needs --enable-lora "
            f"--max-lora-rank {done.max_lora_rank} (or the next value vLLM accepts above it)"
        )
