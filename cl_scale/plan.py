"""`cl-scale plan`: what a recipe will do, checked before a long run starts.

Per task: examples, epochs, optimizer steps, trainable and total parameters; per GPU: a memory estimate
under the recipe's ZeRO stage; the checks a run would otherwise fail on hours in; the launch line.
No weights are loaded: the model is built on PyTorch's meta device from its config (a local directory's
config.json, the built-in tiny specs, or the shipped table of the public models), so planning
Llama-2-13B takes a second, offline, before the gated weights are even downloaded.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cl_scale.builtin.specs import BUILTIN_PREFIX, BUILTINS
from cl_scale.errors import CLScaleError
from cl_scale.methods import method_class

if TYPE_CHECKING:
    from rich.console import Console
    from torch import nn
    from transformers import PretrainedConfig

    from cl_scale.recipe import MethodConfig, Recipe

ModelKind = Literal["causal", "seq2seq"]
GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34
"""Bytes saved for backward per token and hidden unit in one transformer layer, in 16-bit.

From Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"):
s·b·h·(34 + 5·a·s/h) per layer; the 5·a·s/h term is the stored attention matrix, which sdpa / flash
attention never materialises, leaving 34. It counts what full fine-tuning saves; with a frozen base
some inputs of frozen matmuls need not be kept, so this errs high. fp32 doubles it.
"""


# --------------------------------------------------------------------------------------------------
# What the model looks like


@dataclass(frozen=True)
class ModelFacts:
    """The shape of a public model, enough to rebuild its config without the Hub.

    `extra` holds the family-specific config values that change the architecture or its numerics
    (rope scaling, head width, tied embeddings, context length); the rest are the config class defaults,
    which match the published models.
    """

    family: Literal["llama", "qwen2", "mistral", "gemma2", "phi3", "t5"]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    extra: tuple[tuple[str, Any], ...] = ()

    def config(self) -> PretrainedConfig:
        """A transformers config with these facts."""
        if self.family == "t5":
            from transformers import T5Config

            return T5Config(
                d_model=self.hidden,
                d_kv=self.hidden // self.heads,
                d_ff=self.intermediate,
                num_layers=self.layers,
                num_decoder_layers=self.layers,
                num_heads=self.heads,
                vocab_size=self.vocab,
            )
        import transformers

        classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig",
                   "gemma2": "Gemma2Config", "phi3": "Phi3Config"}
        config_class = getattr(transformers, classes[self.family])
        return config_class(
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab,
            **dict(self.extra),
        )


# From the models' config.json on the Hugging Face Hub. Llama-2-7B/13B have no grouped-query attention
# (both: 4096 positions, rms eps 1e-5, where transformers' defaults are 2048 / 1e-6).
_LLAMA2 = (("max_position_embeddings", 4096), ("rms_norm_eps", 1e-5), ("tie_word_embeddings", False))
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
PUBLIC_MODELS: dict[str, ModelFacts] = {
    "meta-llama/Llama-2-7b-hf": ModelFacts("llama", 4096, 32, 32, 32, 11008, 32000, _LLAMA2),
    "meta-llama/Llama-2-13b-hf": ModelFacts("llama", 5120, 40, 40, 40, 13824, 32000, _LLAMA2),
    "google-t5/t5-large": ModelFacts("t5", 1024, 24, 16, 16, 4096, 32128),
    # GQA 32/8, a 128,256 vocabulary, "llama3" rope scaling to 131,072 positions; no pad token.
    "meta-llama/Llama-3.1-8B": ModelFacts("llama", 4096, 32, 32, 8, 14336, 128256, (
        ("max_position_embeddings", 131072), ("rms_norm_eps", 1e-5), ("tie_word_embeddings", False),
        ("rope_parameters", _LLAMA31_ROPE), ("bos_token_id", 128000), ("eos_token_id", 128001),
    )),
    # Biases on q, k and v (Qwen2's attention always has them), GQA 28/4.
    "Qwen/Qwen2.5-7B": ModelFacts("qwen2", 3584, 28, 28, 4, 18944, 152064, (
        ("max_position_embeddings", 131072), ("rms_norm_eps", 1e-6), ("tie_word_embeddings", False),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0}),
    )),
    "mistralai/Mistral-7B-v0.3": ModelFacts("mistral", 4096, 32, 32, 8, 14336, 32768, (
        ("max_position_embeddings", 32768), ("rms_norm_eps", 1e-5), ("tie_word_embeddings", False),
        ("sliding_window", None), ("rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0}),
    )),
    # Heads 256 wide (16 x 256 = 4096 != hidden 3584), tied embeddings; the embedding output is scaled by
    # sqrt(hidden) inside the model, after the lookup (see docs: what the gate reads).
    "google/gemma-2-9b": ModelFacts("gemma2", 3584, 42, 16, 8, 14336, 256000, (
        ("head_dim", 256), ("max_position_embeddings", 8192), ("tie_word_embeddings", True),
        ("query_pre_attn_scalar", 256),
    )),
    # Fused qkv_proj (3072 -> 9216) and gate_up_proj; no GQA.
    "microsoft/Phi-3-mini-4k-instruct": ModelFacts("phi3", 3072, 32, 32, 32, 8192, 32064, (
        ("max_position_embeddings", 4096), ("original_max_position_embeddings", 4096), ("rms_norm_eps", 1e-5),
        ("tie_word_embeddings", False), ("pad_token_id", 32000), ("bos_token_id", 1), ("eos_token_id", 32000),
    )),
}


@dataclass(frozen=True)
class Target:
    """One frozen linear layer that receives a LoRA branch."""

    path: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class Stack:
    """A stack of transformer blocks and the token stream it runs over (sets its sequence length)."""

    path: str
    layers: int
    stream: Literal["prompt+answer", "source", "target"]


@dataclass(frozen=True)
class Architecture:
    """Everything the plan needs from the model, read off a meta-device copy."""

    kind: ModelKind
    hidden: int
    vocab: int
    base_params: int
    largest_unit: int
    """Parameters of the biggest block or embedding: what ZeRO-3 gathers at once."""
    stacks: tuple[Stack, ...]
    targets: tuple[Target, ...]


def _model_config(path: str) -> tuple[PretrainedConfig | None, str]:
    """The config of `path` and where it came from, or None and why not (never touches the network)."""
    from transformers import AutoConfig

    if path.startswith(BUILTIN_PREFIX):
        return _builtin_config(path.removeprefix(BUILTIN_PREFIX))
    if Path(path).is_dir():
        try:
            return AutoConfig.from_pretrained(path), f"config.json in {path}"
        except (OSError, ValueError) as err:
            return None, f"cannot read the config in {path}: {err}"
    if path in PUBLIC_MODELS:
        return PUBLIC_MODELS[path].config(), "cl-scale's table of public model shapes"
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True), "the Hugging Face cache"
    except (OSError, ValueError):
        return None, f"`{path}` is neither a local directory, a known public model nor in the Hugging Face cache"


def _builtin_config(name: str) -> tuple[PretrainedConfig | None, str]:
    """A built-in tiny model's config: its cached folder if built, else its spec (vocab as requested)."""
    try:
        from cl_scale.builtin.factory import built_dir, spec_config
    except ImportError as err:
        return None, f"built-in models are not available in this installation ({err})"
    if name not in BUILTINS:
        return None, f"unknown built-in model `builtin:{name}` (known: {', '.join(BUILTINS)})"
    spec = BUILTINS[name]
    built = built_dir(name)
    if (built / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(built), f"config.json in {built}"
    source = f"the builtin:{name} spec (vocabulary at most {spec.vocab_size}; not built yet)"
    return spec_config(spec, spec.vocab_size), source


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ModuleLists: the block stacks (a T5 block's own list of sub-layers is nested, skipped)."""
    from torch import nn

    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        nested = any(name.startswith(outer + ".") for outer, _ in found)
        if isinstance(module, nn.ModuleList) and len(module) and not nested:
            found.append((name, module))
    return found


def _stream(kind: ModelKind, stack_path: str) -> Literal["prompt+answer", "source", "target"]:
    if kind == "causal":
        return "prompt+answer"
    return "target" if "decoder" in stack_path.split(".") else "source"


def load_architecture(recipe: Recipe) -> tuple[Architecture | None, str]:
    """The recipe's model on the meta device, or None and the reason the counts must be skipped."""
    config, source = _model_config(recipe.model.path)
    if config is None:
        return None, source
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from cl_scale.modeling.inject import default_targets

    kind: ModelKind
    if recipe.model.kind == "auto":
        kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    else:
        kind = recipe.model.kind
    factory = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = factory.from_config(config)
    except (ValueError, KeyError) as err:
        return None, f"cannot build a {kind} model from {source}: {err}"
    names = set(recipe.model.target_modules or default_targets(kind, getattr(config, "model_type", None)))
    targets = tuple(
        Target(name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names
    )
    stacks = _stacks(model)
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    units = [_numel(block) for _, stack in stacks for block in stack] + [_numel(m) for m in embeddings]
    return (
        Architecture(
            kind=kind,
            hidden=model.get_input_embeddings().embedding_dim,
            vocab=config.vocab_size,
            base_params=_numel(model),
            largest_unit=max(units),
            stacks=tuple(Stack(path, len(stack), _stream(kind, path)) for path, stack in stacks),
            targets=targets,
        ),
        source,
    )


# --------------------------------------------------------------------------------------------------
# Parameter counts (docs/methods.md)


@dataclass(frozen=True)
class MethodCounts:
    """Parameters one task adds and trains: a branch (A r×d_in, B d_out×r on every target) and a gate."""

    branch: int
    trained_branch: int
    gate: int
    branches_grow: bool
    """False for SeqLoRA: one branch, trained again on every task."""

    @property
    def trainable(self) -> int:
        """Trained while one task runs: the branch part that trains plus the task's gate."""
        return self.trained_branch + self.gate

    def added(self, stage: int) -> int:
        """Branch and gate parameters present after `stage` tasks (1-based)."""
        branches = stage if self.branches_grow else 1
        return branches * self.branch + stage * self.gate


def method_counts(arch: Architecture, method: MethodConfig) -> MethodCounts:
    """Branch and gate sizes for this model and method, from the method's own counting rules."""
    facts = method_class(method.name)
    per_layer = [facts.branch_parameters_per_layer(method, t.d_in, t.d_out) for t in arch.targets]
    return MethodCounts(
        sum(added for added, _ in per_layer),
        sum(trained for _, trained in per_layer),
        facts.gate_parameters(method, arch.hidden),
        facts.grows_branch,
    )


# --------------------------------------------------------------------------------------------------
# Memory per GPU


@dataclass(frozen=True)
class MemoryItem:
    """One component of the estimate, with the arithmetic that produced it."""

    name: str
    bytes: float
    how: str


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes while training the last task (most frozen branches); an estimate, not a measurement."""

    items: tuple[MemoryItem, ...]
    statistics: MemoryItem | None
    """Second moments held during the no-grad data pass before a task (InfLoRA branches); not in `total`."""

    @property
    def total(self) -> float:
        return sum(item.bytes for item in self.items)

    def item(self, name: str) -> MemoryItem:
        """The component called `name`."""
        return next(item for item in self.items if item.name == name)


def _split(count: float, world: int, partitioned: bool) -> tuple[float, str]:
    return (count / world, f" / {world} GPUs") if partitioned and world > 1 else (count, "")


def estimate_memory(
    arch: Architecture, counts: MethodCounts, recipe: Recipe, *, stages: int, world: int, ds_config: dict[str, Any]
) -> MemoryEstimate:
    """Per-GPU memory under the config's ZeRO stage: stage 1 partitions optimizer states, 2 also
    gradients, 3 also parameters; offload moves parameters / optimizer states to the CPU."""
    from cl_scale.ds_config import gathers_in_place, offloaded, zero_stage

    stage = zero_stage(ds_config)
    off_params = stage == 3 and offloaded(ds_config, "offload_param")
    off_optimizer = offloaded(ds_config, "offload_optimizer")
    dtype = recipe.model.dtype
    p = DTYPE_BYTES[dtype]
    trainable = counts.trainable
    frozen_lora = counts.added(stages) - trainable  # old branches and gates, and a frozen A of the current one
    items: list[MemoryItem] = []

    def params(name: str, count: int, what: str) -> None:
        if off_params:
            items.append(MemoryItem(name, 0.0, f"{count:,} {what}: offloaded to CPU (offload_param)"))
            return
        value, share = _split(count * p, world, stage == 3)
        items.append(MemoryItem(name, value, f"{count:,} {what} × {p} B ({dtype}){share}"))

    params("base model", arch.base_params, "frozen parameters")
    params("frozen branches and gates", frozen_lora, f"frozen LoRA and gate parameters at task {stages}")
    if stage == 3 and not gathers_in_place(ds_config, world):
        unit = 2 * arch.largest_unit * p
        items.append(MemoryItem(
            "ZeRO-3 gathered layers", unit,
            f"largest block/embedding ({arch.largest_unit:,}) gathered + one prefetched, × {p} B",
        ))
    params("trainable parameters", trainable, "parameters")
    value, share = _split(trainable * p, world, stage >= 2)
    items.append(MemoryItem("gradients", value, f"{trainable:,} × {p} B{share}"))
    state = 12 if p == 2 else 8  # fp32 master + Adam m and v; in fp32 the parameter is its own master
    if off_optimizer:
        items.append(MemoryItem("optimizer states", 0.0, "offloaded to CPU (offload_optimizer)"))
    else:
        value, share = _split(trainable * state, world, stage >= 1)
        what = "fp32 master, Adam m, v" if p == 2 else "Adam m, v"
        items.append(MemoryItem("optimizer states", value, f"{trainable:,} × {state} B ({what}){share}"))
    items.append(_activations(arch, recipe))
    items.append(_logits(arch, recipe))
    return MemoryEstimate(tuple(items), _statistics(arch, recipe))


def _seq(stack: Stack, recipe: Recipe) -> int:
    data = recipe.data
    return {
        "prompt+answer": data.max_source_length + data.max_target_length,
        "source": data.max_source_length,
        "target": data.max_target_length,
    }[stack.stream]


def _activations(arch: Architecture, recipe: Recipe) -> MemoryItem:
    """C·s·b·h bytes per layer (C = ACTIVATION_BYTES_PER_TOKEN_HIDDEN, ×2 in fp32) for one micro-batch at
    the longest padded length; with gradient checkpointing, each layer keeps its input (2·s·b·h) and
    one layer at a time is recomputed in full."""
    b, h = recipe.train.per_device_batch, arch.hidden
    scale = DTYPE_BYTES[recipe.model.dtype] / 2
    c = ACTIVATION_BYTES_PER_TOKEN_HIDDEN
    per_layer = {stack.path: c * _seq(stack, recipe) * b * h * scale for stack in arch.stacks}
    shapes = ", ".join(f"{s.layers} layers × s={_seq(s, recipe)}" for s in arch.stacks)
    if recipe.train.gradient_checkpointing:
        kept = sum(2 * _seq(s, recipe) * b * h * scale * s.layers for s in arch.stacks)
        value = kept + max(per_layer.values())
        how = f"checkpointing: 2·s·b·h per layer kept + one layer at {c}·s·b·h ({shapes}, b={b}, h={h})"
    else:
        value = sum(per_layer[s.path] * s.layers for s in arch.stacks)
        how = f"{c}·s·b·h{' × 2 (fp32)' if scale == 2 else ''} per layer ({shapes}, b={b}, h={h})"
    return MemoryItem("activations (one micro-batch)", value, how)


def _logits(arch: Architecture, recipe: Recipe) -> MemoryItem:
    """Logits over the vocabulary in the model dtype plus the fp32 copy the loss makes."""
    data = recipe.data
    s = data.max_source_length + data.max_target_length if arch.kind == "causal" else data.max_target_length
    b, per = recipe.train.per_device_batch, DTYPE_BYTES[recipe.model.dtype] + 4
    return MemoryItem("logits and loss", s * b * arch.vocab * per, f"s={s} × b={b} × vocab {arch.vocab:,} × {per} B")


def _statistics(arch: Architecture, recipe: Recipe) -> MemoryItem | None:
    """InfLoRA's d_in × d_in fp32 second moments, as many at once as method.stats_modules_per_pass allows."""
    method = recipe.method
    if method_class(method.name).trains_a(method) or not arch.targets:
        return None
    d_in = max(t.d_in for t in arch.targets)
    at_once = min(method.stats_modules_per_pass or len(arch.targets), len(arch.targets))
    return MemoryItem(
        "second moments (data pass, not in total)", at_once * d_in * d_in * 4,
        f"{at_once} modules × {d_in}² × 4 B at most (method.stats_modules_per_pass); before each task, "
        "while no gradients or optimizer steps run",
    )


# --------------------------------------------------------------------------------------------------
# Data, checks, launch line, the plan


@dataclass(frozen=True)
class Check:
    """Something the user should know: an error stops the run, a warning does not."""

    level: Literal["error", "warning"]
    subject: str
    message: str


@dataclass(frozen=True)
class TaskPlan:
    """One stage of the run; None where the data or the model could not be read."""

    stage: int
    task: str
    examples: int | None
    epochs: int
    steps: int | None
    trainable: int | None
    total: int | None


@dataclass(frozen=True)
class Plan:
    """Everything `cl-scale plan` reports, computed without loading weights."""

    recipe: str
    model: str
    model_source: str
    method: str
    gpus: int
    nodes: int
    zero_stage: int
    per_device_batch: int
    global_batch: int
    accumulation: int | None
    tasks: tuple[TaskPlan, ...]
    memory: MemoryEstimate | None
    checks: tuple[Check, ...]
    launch: str

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.level == "error"]


def _train_examples(recipe: Recipe, task: str) -> tuple[int | None, list[Check]]:
    """Training examples of `task` after data.max_train_examples, and what is wrong with its splits."""
    from cl_scale.data.benchmark import SPLITS, count_examples, split_file
    from cl_scale.data.own_tasks import check_own_task
    from cl_scale.data.tasks import load_task, task_info

    try:
        info = task_info(recipe.data, task)
    except CLScaleError as err:
        return None, [Check("error", task, err.problem)]
    if info.files is not None:  # own task: every record of every split it names read and checked
        try:
            check_own_task(info.files)
        except CLScaleError as err:
            return None, [Check("error", task, err.problem)]
    if info.path is None:  # built-in task: generated, never missing; own task: checked above
        return len(load_task(recipe.data, task, "train", seed=recipe.train.seed)), []
    consequence = {"dev": "", "test": ": this task cannot be scored"}
    checks = [
        Check("warning", task, f"{split} split missing ({split_file(info, split)}){consequence[split]}")
        for split in SPLITS
        if split != "train" and not split_file(info, split).is_file()
    ]
    if not split_file(info, "train").is_file():
        checks.append(Check("error", task, f"train split missing ({split_file(info, 'train')}): the run stops here"))
        return None, checks
    try:
        count = count_examples(info, "train")
    except CLScaleError as err:
        return None, [*checks, Check("error", task, err.problem)]
    cap = recipe.data.max_train_examples
    return (count if cap is None else min(count, cap)), checks


def _ds_config(recipe: Recipe, world: int) -> tuple[dict[str, Any], int | None, Check | None]:
    """The DeepSpeed config, the accumulation steps, and the batch check (the stage never depends on it)."""
    from cl_scale.ds_config import batch_layout, build_ds_config

    train = recipe.train
    try:
        accumulation = batch_layout(train.global_batch, train.per_device_batch, world)
    except CLScaleError as err:
        fallback = train.model_copy(update={"global_batch": world, "per_device_batch": 1})
        config = build_ds_config(recipe.model_copy(update={"train": fallback}), world)
        return config, None, Check("error", "batch", f"{err.problem}; fix: {err.fix}")
    return build_ds_config(recipe, world), accumulation, None


def launch_command(recipe_path: str, overrides: Sequence[str], *, gpus: int, nodes: int) -> str:
    """The command that trains this recipe on `gpus` per node × `nodes`, overrides carried as --set."""
    args = " ".join(shlex.quote(word) for word in [recipe_path, *(x for o in overrides for x in ("--set", o))])
    if nodes > 1:
        return f"sbatch --nodes {nodes} slurm/train.sbatch {args}"
    if gpus > 1:
        return f"deepspeed --num_gpus {gpus} $(which cl-scale) train {args}"
    return f"cl-scale train {args}"


def _task_rows(
    recipe: Recipe, tasks: list[str], arch: Architecture | None, counts: MethodCounts | None
) -> tuple[list[TaskPlan], list[Check]]:
    """One row per stage, and the data checks: absent root (warning), split and size problems per task."""
    from cl_scale.data.tasks import SYNTHETIC_ROOT

    root, train = recipe.data.root, recipe.train
    checks: list[Check] = []
    have_data = root == SYNTHETIC_ROOT or Path(root).is_dir()
    if not have_data:
        where = "" if Path(root).is_absolute() else f" (from {Path.cwd()})"
        checks.append(Check(
            "warning", "data",
            f"data root {root}{where} not found: example counts and steps skipped (CL_Benchmark comes from "
            "the public O-LoRA / GainLoRA repositories)",
        ))
    rows = []
    for stage, task in enumerate(tasks, start=1):
        examples, task_checks = _train_examples(recipe, task) if have_data else (None, [])
        checks += task_checks
        epochs = train.epochs_for(task)
        steps = None if examples is None else examples // train.global_batch * epochs
        if steps == 0:
            checks.append(Check("warning", task, f"{examples} examples < global batch {train.global_batch}: no step"))
        trainable = total = None
        if arch is not None and counts is not None:
            trainable, total = counts.trainable, arch.base_params + counts.added(stage)
        rows.append(TaskPlan(stage, task, examples, epochs, steps, trainable, total))
    return rows, checks


def make_plan(
    recipe: Recipe, *, gpus: int, nodes: int, recipe_path: str = "RECIPE.yaml", overrides: Sequence[str] = ()
) -> Plan:
    """Tasks, steps, parameters, memory, checks and launch line for `recipe` on gpus × nodes."""
    from cl_scale.data.orders import resolve_tasks
    from cl_scale.ds_config import zero_stage

    if gpus < 1 or nodes < 1:
        raise CLScaleError(f"--gpus {gpus} --nodes {nodes}", "use at least one GPU and one node")
    world = gpus * nodes
    tasks = resolve_tasks(recipe.data.order, recipe.data.tasks)
    ds_config, accumulation, batch_check = _ds_config(recipe, world)
    checks: list[Check] = [batch_check] if batch_check else []

    arch, source = load_architecture(recipe)
    counts = memory = None
    if arch is None:
        checks.append(Check("warning", "model", f"{source}; parameter counts and memory skipped"))
    elif not arch.targets:
        names = recipe.model.target_modules or "the defaults"
        checks.append(Check("error", "model", f"no linear layer matches target_modules {names}"))
    else:
        counts = method_counts(arch, recipe.method)
        memory = estimate_memory(arch, counts, recipe, stages=len(tasks), world=world, ds_config=ds_config)
    rows, data_checks = _task_rows(recipe, tasks, arch, counts)
    method = recipe.method
    return Plan(
        recipe=recipe.name or recipe_path,
        model=recipe.model.path,
        model_source=source,
        method=method_class(method.name).label(method),
        gpus=gpus,
        nodes=nodes,
        zero_stage=zero_stage(ds_config),
        per_device_batch=recipe.train.per_device_batch,
        global_batch=recipe.train.global_batch,
        accumulation=accumulation,
        tasks=tuple(rows),
        memory=memory,
        checks=(*checks, *data_checks),
        launch=launch_command(recipe_path, overrides, gpus=gpus, nodes=nodes),
    )


# --------------------------------------------------------------------------------------------------
# Printing


def _n(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _print(plan: Plan, console: Console) -> None:
    from rich.table import Table

    accumulation = "?" if plan.accumulation is None else plan.accumulation
    console.print(
        f"[bold]{plan.recipe}[/bold]: {plan.method} on {plan.model} (shape from {plan.model_source})\n"
        f"{plan.gpus} GPU(s) × {plan.nodes} node(s) = world {plan.world_size}, ZeRO stage {plan.zero_stage}; "
        f"batch {plan.per_device_batch} per GPU × {plan.world_size} × {accumulation} accumulation = "
        f"{plan.global_batch}",
        highlight=False,
    )
    tasks = Table(title="Tasks")
    for column in ("#", "task", "examples", "epochs", "steps", "trainable", "total params"):
        if column == "task":
            tasks.add_column(column, overflow="fold")
        else:
            tasks.add_column(column, justify="right", no_wrap=True)
    for row in plan.tasks:
        tasks.add_row(str(row.stage), row.task, _n(row.examples), str(row.epochs), _n(row.steps),
                      _n(row.trainable), _n(row.total))
    steps = [row.steps for row in plan.tasks]
    if None not in steps:
        tasks.add_row("", "[bold]all[/bold]", "", "", f"[bold]{sum(steps):,}[/bold]", "", "")
    console.print(tasks)
    if plan.memory is not None:
        memory = Table(title="Memory per GPU (estimate, while training the last task)")
        for column in ("component", "GiB", "how"):
            memory.add_column(column, justify="right" if column == "GiB" else "left", no_wrap=column != "how")
        for item in plan.memory.items:
            memory.add_row(item.name, f"{item.bytes / GIB:.2f}", item.how)
        memory.add_row("[bold]total[/bold]", f"[bold]{plan.memory.total / GIB:.2f}[/bold]",
                       "plus CUDA context, allocator slack and communication buckets (~1-3 GiB)")
        if plan.memory.statistics is not None:
            stats = plan.memory.statistics
            memory.add_row(stats.name, f"{stats.bytes / GIB:.2f}", stats.how)
        console.print(memory)
    if plan.checks:
        checks = Table(title="Checks")
        for column in ("level", "what", "message"):
            checks.add_column(column, overflow="fold", no_wrap=column != "message")
        for check in plan.checks:
            colour = "red" if check.level == "error" else "yellow"
            checks.add_row(f"[{colour}]{check.level}[/{colour}]", check.subject, check.message)
        console.print(checks)
    per_node = f" (the sbatch script sets the GPUs per node; this plan assumed {plan.gpus})" if plan.nodes > 1 else ""
    console.print(f"[bold]launch[/bold]{per_node}:", highlight=False)
    console.print(plan.launch, markup=False, highlight=False, soft_wrap=True)


def plan_cli(
    recipe: Recipe,
    *,
    gpus: int,
    nodes: int,
    recipe_path: str = "RECIPE.yaml",
    overrides: Sequence[str] = (),
) -> None:
    """Print the plan; exit with an error (after printing) when a check would stop the run.

    `recipe_path` and `overrides` (as typed) make the printed launch line pasteable.
    """
    from rich.console import Console

    plan = make_plan(recipe, gpus=gpus, nodes=nodes, recipe_path=recipe_path, overrides=overrides)
    _print(plan, Console())
    if plan.errors:
        where = ", ".join(dict.fromkeys(check.subject for check in plan.errors))
        raise CLScaleError(
            f"the plan found {len(plan.errors)} error(s) that would stop the run ({where})",
            "fix the rows marked error in the Checks table above, then plan again",
        )


def task_steps(recipe: Recipe, tasks: list[str]) -> list[int | None]:
    """Optimizer steps of each task's stage (None where its data cannot be counted), for the run's ETA."""
    rows, _ = _task_rows(recipe, tasks, None, None)
    return [row.steps for row in rows]
