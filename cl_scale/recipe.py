"""The recipe: one validated YAML file that describes a whole continual-learning run.

Loading keeps the line number of every key so that a mistake is reported where the user made it,
and dotted overrides (`train.lr=1e-4`) are applied before validation so they are checked the same way.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from cl_scale.builtin.specs import BUILTIN_PREFIX, BUILTINS
from cl_scale.data.orders import ORDERS
from cl_scale.errors import CLScaleError
from cl_scale.methods import BRANCH_NAMES, METHOD_NAMES
from cl_scale.shipped import shipped_file

Key = tuple[str | int, ...]

# YAML 1.1 (PyYAML) needs a dot and a signed exponent for a float, so `1e-4` would load as a string.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """Safe loader that also reads `1e-4` and `1E5` as floats."""


class _Dumper(yaml.SafeDumper):
    """Safe dumper that quotes strings `_Loader` would read back as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


# --------------------------------------------------------------------------------------------------
# Schema


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """Which base model to load and how."""

    path: str = Field(min_length=1)
    kind: Literal["auto", "causal", "seq2seq"] = "auto"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    target_modules: list[str] | None = Field(default=None, min_length=1)
    attn_implementation: str = "sdpa"
    pad_token_id: int | None = Field(default=None, ge=0)
    init_adapter: str | None = None
    """A PEFT LoRA adapter folder the first task's branch starts from (cl_scale/init_adapter.py)."""

    @field_validator("path")
    @classmethod
    def _builtin_is_known(cls, value: str) -> str:
        if value.startswith(BUILTIN_PREFIX) and value.removeprefix(BUILTIN_PREFIX) not in BUILTINS:
            raise ValueError(f"a built-in model ({', '.join(BUILTIN_PREFIX + name for name in BUILTINS)}) or a model path")
        return value


_TEMPLATE_RULE = "auto, superni, long, or a custom template containing {input} (and optionally {definition})"


def _check_template(value: str) -> str:
    if value not in ("auto", "superni", "long") and "{input}" not in value:
        raise ValueError(_TEMPLATE_RULE)
    return value


class TaskFilesConfig(_Section):
    """A task of the user's own files (an entry of `data.tasks` written as a mapping); paths are relative
    to the working directory, like `data.root`."""

    name: str = Field(min_length=1)
    train: str = Field(min_length=1)
    test: str = Field(min_length=1)
    dev: str | None = Field(default=None, min_length=1)
    input_field: str = Field(default="input", min_length=1)
    output_field: str = Field(default="output", min_length=1)
    instruction: str | None = None
    metric: Literal["rouge", "exact"]
    template: str | None = None

    @field_validator("template")
    @classmethod
    def _template_has_input(cls, value: str | None) -> str | None:
        return None if value is None else _check_template(value)


# pydantic names the chosen branch of `data.tasks` entries in error locations; _issue drops it again.
_FILES_TAG = "own task"
TaskEntry = Annotated[
    Annotated[str, Tag("name")] | Annotated[TaskFilesConfig, Tag(_FILES_TAG)],
    Discriminator(lambda value: _FILES_TAG if isinstance(value, dict | TaskFilesConfig) else "name"),
]


class DataConfig(_Section):
    """Where the tasks come from, in which order, and how prompts are built.

    `tasks` mixes names (CL_Benchmark folders under `root`, or the built-in suite) with own tasks
    (mappings, see TaskFilesConfig) in the order they are trained.
    """

    root: str = "../shared/CL_Benchmark"
    order: str | None = None
    tasks: list[TaskEntry] | None = Field(default=None, min_length=1)
    template: str = "auto"
    chat_template: bool = False
    trailing_space: Literal["prompt", "answer"] = "prompt"
    """Which side of the prompt/answer token boundary a prompt's trailing whitespace ("Output: ") is
    tokenised on, for decoder-only models. "prompt" is the published layout; "answer" gives a byte-level
    BPE tokenizer the answer's first word with its leading space instead of a lone space token (the text
    is the same; see docs/RESULTS.md for what it does to a real model's loss)."""
    max_source_length: int = Field(default=512, gt=0)
    max_target_length: int = Field(default=50, gt=0)
    max_train_examples: int | None = Field(default=None, gt=0)
    max_eval_examples: int | None = Field(default=None, gt=0)

    @field_validator("template")
    @classmethod
    def _template_has_input(cls, value: str) -> str:
        return _check_template(value)

    @field_validator("order")
    @classmethod
    def _order_is_known(cls, value: str | None) -> str | None:
        if value is not None and value not in ORDERS:
            close = difflib.get_close_matches(value, ORDERS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"a named order{hint}: one of {', '.join(ORDERS)}")
        return value

    @model_validator(mode="after")
    def _trailing_space_outside_chat(self) -> DataConfig:
        if self.chat_template and self.trailing_space == "answer":
            raise ValueError("trailing_space=answer is for plain prompts; a chat template's turn ends the prompt "
                             "(set data.trailing_space=prompt or data.chat_template=false)")
        return self

    @model_validator(mode="after")
    def _one_task_source(self) -> DataConfig:
        if (self.order is None) == (self.tasks is None):
            raise ValueError("exactly one of `data.order` (a named order) or `data.tasks` (a list of task names)")
        return self


class GateConfig(_Section):
    """GainLoRA gate: an MLP per task on the mean prompt embedding."""

    hidden: int = Field(default=100, gt=0)
    restore_row_norm: bool = False


class OLoRAConfig(_Section):
    """O-LoRA penalties: orthogonality to old A's and L2 on the new branch."""

    lambda_orth: float = Field(default=0.5, ge=0)
    lambda_l2: float = Field(default=0.0, ge=0)


class NLoRAConfig(_Section):
    """N-LoRA sparsity penalty."""

    lambda_l1: float = Field(default=0.4, ge=0)
    variant: Literal["update", "compat"] = "update"


class InfLoRAConfig(_Section):
    """How InfLoRA designs the frozen A of a new branch."""

    design: Literal["svd", "random"] = "svd"


class MethodConfig(_Section):
    """The continual-learning method and its hyperparameters."""

    name: str = "gainlora"
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    branch: str = "inflora"
    threshold: float = Field(default=0.995, gt=0, le=1)
    energy: Literal["squared", "classic"] = "squared"
    stats_modules_per_pass: int | None = Field(default=None, gt=0)
    gate: GateConfig = Field(default_factory=GateConfig)
    olora: OLoRAConfig = Field(default_factory=OLoRAConfig)
    nlora: NLoRAConfig = Field(default_factory=NLoRAConfig)
    inflora: InfLoRAConfig = Field(default_factory=InfLoRAConfig)

    @field_validator("name")
    @classmethod
    def _method_is_known(cls, value: str) -> str:
        return _one_of(value, METHOD_NAMES)

    @field_validator("branch")
    @classmethod
    def _branch_is_known(cls, value: str) -> str:
        return _one_of(value, BRANCH_NAMES)


def _one_of(value: str, names: tuple[str, ...]) -> str:
    if value not in names:
        raise ValueError(f"one of {', '.join(repr(name) for name in names)}")
    return value


class TrainConfig(_Section):
    """Optimisation of each task; the world-size divisibility of global_batch is checked at train time."""

    epochs: int = Field(default=1, gt=0)
    epochs_per_task: dict[str, int] = Field(default_factory=dict)
    lr: float = Field(default=3.0e-4, gt=0)
    per_device_batch: int = Field(default=8, gt=0)
    """Examples per micro-batch on each device: memory, not results. A step's loss is the mean over every
    loss token of its global batch however the batch is split (`trainer.token_weights`)."""
    global_batch: int = Field(default=32, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = Field(default=42, ge=0)
    gradient_checkpointing: bool = False
    log_every: int = Field(default=1, gt=0)
    log_interval_s: float = Field(default=60.0, gt=0)
    """Off a terminal, a progress line at least this often (as steps finish), besides every log_every steps."""
    checkpoint_every_steps: int = Field(default=0, ge=0)
    """Engine checkpoint every this many optimizer steps inside a task, for --resume within it (0: off)."""
    tensorboard: bool = False
    collective_timeout_s: int = Field(default=600, gt=0)

    def epochs_for(self, task: str) -> int:
        """Epochs of `task`: its own entry in epochs_per_task, else epochs."""
        return self.epochs_per_task.get(task, self.epochs)

    @field_validator("epochs_per_task")
    @classmethod
    def _positive_epochs(cls, value: dict[str, int]) -> dict[str, int]:
        bad = [task for task, epochs in value.items() if epochs <= 0]
        if bad:
            raise ValueError(f"a positive number of epochs for every task (not for {', '.join(bad)})")
        return value


class DeepSpeedConfig(_Section):
    """The DeepSpeed JSON config and values merged into it."""

    config: str = "ds_configs/zero3.json"
    overrides: dict[str, Any] = Field(default_factory=dict)

    def config_path(self) -> Path:
        """The config file: as given if it exists (absolute or from the cwd), else the one cl-scale ships."""
        given = Path(self.config).expanduser()
        if given.is_file():
            return given
        shipped = None if given.is_absolute() else shipped_file(given)
        if shipped is not None:
            return shipped
        raise CLScaleError(
            f"DeepSpeed config `{self.config}` not found (looked in the current directory and cl-scale's ds_configs)",
            "set `deepspeed.config` to an existing JSON file, e.g. ds_configs/zero3.json",
        )


_METRICS = ("rouge", "exact")


class EvalConfig(_Section):
    """Which stages are evaluated and how answers are scored."""

    metric: Literal["auto", "rouge", "exact"] | dict[str, Literal["rouge", "exact"]] = "auto"
    max_new_tokens: int = Field(default=50, gt=0)
    batch_size: int = Field(default=16, gt=0)
    stages: Literal["all", "final", "none"] | list[int] = "all"

    def evaluated_stages(self, num_tasks: int) -> set[int]:
        """0-based indices of the stages evaluated in a run of `num_tasks` tasks."""
        if self.stages == "all":
            return set(range(num_tasks))
        if self.stages == "final":
            return {num_tasks - 1}
        if self.stages == "none":
            return set()
        return {k - 1 for k in self.stages if k <= num_tasks}

    @field_validator("metric", mode="before")
    @classmethod
    def _check_metric(cls, value: Any) -> Any:
        if isinstance(value, dict):
            bad = [f"{task}: {metric!r}" for task, metric in value.items() if metric not in _METRICS]
            if bad:
                raise ValueError(f"rouge or exact for every task (got {', '.join(bad)})")
            return value
        if value not in ("auto", *_METRICS):
            raise ValueError("auto, rouge, exact, or a mapping task -> rouge|exact")
        return value

    @field_validator("stages", mode="before")
    @classmethod
    def _check_stages(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in value):
                raise ValueError("a non-empty list of 1-based stage numbers, e.g. [1, 5, 15]")
            return value
        if value not in ("all", "final", "none"):
            raise ValueError("all, final, none, or a list of 1-based stage numbers")
        return value


class OutputConfig(_Section):
    """Where run directories go: <dir>/<name>."""

    dir: str = "runs"


class Recipe(_Section):
    """A whole run: model, task sequence, method, training, DeepSpeed, evaluation and output."""

    name: str | None = None
    model: ModelConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "/" in value or "\\" in value or value in (".", "..")):
            raise ValueError("a run name usable as a directory name (no slashes)")
        return value


# --------------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `dotted.key=value`; the value is typed by YAML rules so `1e-4`, `true`, `[a,b]` and `null` work."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(part.strip() for part in path):
        raise CLScaleError(
            f"malformed override `{text}`",
            "write overrides as dotted.key=value, e.g. train.lr=1e-4 or method.gate.hidden=64",
        )
    try:
        value = yaml.load(raw, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as error:
        raise CLScaleError(
            f"override `{text}`: the value is not valid YAML ({getattr(error, 'problem', error)})",
            "quote the value, e.g. data.template='Q: {input}'",
        ) from None
    return [part.strip() for part in path], value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with every override set, creating missing sections on the way."""
    result = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise CLScaleError(
                    f"override `{text}`: `{where}` is a value ({child!r}), not a section with keys",
                    f"set `{where}` itself, e.g. {where}=...",
                )
            node = child
        node[path[-1]] = value
    return result


# --------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply overrides, validate; `name` defaults to the file stem."""
    source = Path(path)
    if not source.is_file():
        what = "is a directory, not a recipe file" if source.is_dir() else "not found"
        raise CLScaleError(
            f"recipe `{source}` {what}",
            "pass the path of a YAML recipe, e.g. recipes/demo.yaml",
        )
    data, lines = _read_yaml(source)
    data = apply_overrides(data, overrides)
    if data.get("name") is None:
        data["name"] = source.stem
    origins = {tuple(parse_override(text)[0]): text for text in overrides}
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise _explain(error, data, source, lines, origins) from None


def _read_yaml(source: Path) -> tuple[dict[str, Any], dict[Key, int]]:
    """Parse the file once, returning the data and the 1-based line of every mapping key."""
    try:
        loader = _Loader(source.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except UnicodeDecodeError:
        raise CLScaleError(f"{source} is not a UTF-8 text file", "pass a YAML recipe, e.g. recipes/demo.yaml") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error)
        raise CLScaleError(
            f"{source}{where}: malformed YAML: {problem}",
            "check indentation and quoting near that line; keys need `key: value` with a space after the colon",
        ) from None
    if not isinstance(data, dict):
        raise CLScaleError(
            f"{source}: a recipe must be a mapping of sections (model:, data:, ...), got a {type(data).__name__}",
            "start from recipes/demo.yaml",
        )
    lines: dict[Key, int] = {}
    _record_lines(node, (), source, lines)
    return data, lines


def _record_lines(node: yaml.Node, prefix: Key, source: Path, lines: dict[Key, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (key_node.value,)
            if key in lines:
                raise CLScaleError(
                    f"{source} line {key_node.start_mark.line + 1}: key `{_dotted(key)}` is set twice "
                    f"(first on line {lines[key]})",
                    "keep one of them",
                )
            lines[key] = key_node.start_mark.line + 1
            _record_lines(value_node, key, source, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[prefix + (index,)] = item.start_mark.line + 1
            _record_lines(item, prefix + (index,), source, lines)


# --------------------------------------------------------------------------------------------------
# Turning pydantic errors into one message


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping of keys to values",
    "model_type": "a section (a mapping of keys to values)",
    "model_attributes_type": "a section (a mapping of keys to values)",
    "too_short": "a non-empty list",
    "string_too_short": "a non-empty string",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _explain(
    error: ValidationError,
    data: dict[str, Any],
    source: Path,
    lines: dict[Key, int],
    origins: dict[Key, str],
) -> CLScaleError:
    issues = [_issue(item, data, source, lines, origins) for item in error.errors()]
    unique = list(dict.fromkeys(issues))
    if len(unique) == 1:
        return CLScaleError(*unique[0])
    problem = f"{len(unique)} problems in the recipe:\n" + "\n".join(f"  - {p} ({f})" for p, f in unique)
    return CLScaleError(problem, "correct each key listed above")


def _issue(
    item: Any, data: dict[str, Any], source: Path, lines: dict[Key, int], origins: dict[Key, str]
) -> tuple[str, str]:
    loc: Key = tuple(part for part in item["loc"] if part != _FILES_TAG)
    kind = item["type"]
    where = _where(loc, source, lines, origins)
    key = _dotted(loc)
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        parent = _dotted(loc[:-1])
        hint = (
            f"did you mean `{_dotted((*loc[:-1], close[0]))}`?"
            if close
            else f"valid keys {'in `' + parent + '`' if parent else 'at the top level'}: {', '.join(valid)}"
        )
        return f"{where}unknown key `{key}`", hint
    if kind == "missing":
        return f"{where}required key `{key}` is missing", f"add `{key}` to the recipe (see recipes/demo.yaml)"
    expected = _expected(item)
    given = _given(loc, data)
    problem = f"{where}`{key}`: expected {expected}" + ("" if given is None else f", got {given}")
    return problem, f"set `{key}` to {expected}"


def _where(loc: Key, source: Path, lines: dict[Key, int], origins: dict[Key, str]) -> str:
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in origins:
            return f"override `{origins[loc[:depth]]}`: "
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return f"{source} line {lines[loc[:depth]]}: "
    return f"{source}: "


def _expected(item: Any) -> str:
    kind = item["type"]
    ctx = item.get("ctx") or {}
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"a number {_BOUNDS[kind]} {bound}"
    if kind == "value_error":
        return str(ctx.get("error", item["msg"]))
    return item["msg"]


def _given(loc: Key, data: Any) -> str | None:
    """The offending value as the user wrote it; None for a whole section (its keys say more)."""
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(node, dict):
        return None
    return f"{json.dumps(node, default=str)} ({'null' if node is None else type(node).__name__})"


def _valid_keys(loc: Key) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):  # an entry of a list: its section type was found with the list
            continue
        section = _section_of(model.model_fields[str(part)].annotation)
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section type an annotation holds, also inside a list, union or Annotated (data.tasks entries)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in get_args(annotation) if (found := _section_of(arg)) is not None), None)


def _dotted(loc: Key) -> str:
    return ".".join(str(part) for part in loc)


# --------------------------------------------------------------------------------------------------
# Writing and comparing


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (every default filled in)."""
    return recipe.model_dump(mode="json")


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML; `load_recipe` reads it back to an equal Recipe."""
    return yaml.dump(recipe_to_dict(recipe), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def diff_recipes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per changed leaf, `train.lr: 0.0003 -> 0.0001`, so `--resume` can show what changed."""
    before, after = _flatten(old), _flatten(new)
    changed = []
    for key in [*before, *(k for k in after if k not in before)]:
        if before.get(key, _ABSENT) != after.get(key, _ABSENT):
            changed.append(f"{key}: {_show(before.get(key, _ABSENT))} -> {_show(after.get(key, _ABSENT))}")
    return changed


_ABSENT = object()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, default=str)
