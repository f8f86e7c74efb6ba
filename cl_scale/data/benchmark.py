"""Reader for the CL_Benchmark layout `<root>/<Benchmark>/<task>/{train,dev,test}.json`.

Every defect of a copy (missing root, missing or empty split, damaged JSON) becomes a CLScaleError that
names the file, because the public copies are known to lack some splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from datasets import Dataset

from cl_scale.data.examples import draw_target, make_examples, subset_indices
from cl_scale.data.names import unknown_name
from cl_scale.errors import CLScaleError

if TYPE_CHECKING:
    from cl_scale.data.own_tasks import TaskFiles

SPLITS = ("train", "dev", "test")
_SOURCE = "the public O-LoRA / GainLoRA repositories (folder CL_Benchmark)"


@dataclass(frozen=True)
class TaskInfo:
    """Where a task lives; `path` is None for built-in tasks that have no files."""

    name: str
    benchmark: str
    path: Path | None
    files: TaskFiles | None = None
    """An own task's recipe entry (data.tasks written as a mapping); None for benchmark and built-in tasks."""


def default_metric(info: TaskInfo) -> Literal["rouge", "exact"]:
    """An own task's metric; else ROUGE-L for the SuperNI generation tasks, exact match for the rest."""
    if info.files is not None:
        return info.files.metric
    return "rouge" if info.benchmark == "SuperNI" else "exact"


def list_tasks(root: str | Path) -> list[TaskInfo]:
    """Every task folder under `root`, sorted by benchmark then name."""
    base = Path(root)
    if not base.is_dir():
        raise CLScaleError(
            f"benchmark data not found: {base} does not exist",
            f"point data.root at a CL_Benchmark folder; it comes from {_SOURCE}",
        )
    return [
        TaskInfo(task.name, bench.name, task)
        for bench in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        for task in sorted(p for p in bench.iterdir() if p.is_dir())
    ]


def find_task(root: str | Path, name: str) -> TaskInfo:
    """The task folder called `name` in any benchmark under `root`."""
    found = [info for info in list_tasks(root) if info.name == name]
    if not found:
        raise unknown_name("task", name, {info.name for info in list_tasks(root)})
    if len(found) > 1:
        places = ", ".join(str(info.path) for info in found)
        raise CLScaleError(f"task {name!r} exists in several benchmarks: {places}", "keep one copy under data.root")
    return found[0]


def split_file(info: TaskInfo, split: str) -> Path:
    """The JSON file of one split; checks the split name, not the file."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    assert info.path is not None, f"{info.name} is a built-in task without files"
    return info.path / f"{split}.json"


def read_instances(info: TaskInfo, split: str) -> tuple[str, list[dict[str, Any]]]:
    """The first definition ("" when none) and the raw instances of a split, validated."""
    path = split_file(info, split)
    if not path.is_file():
        raise CLScaleError(
            f"{info.name}: split file {path} is missing",
            f"this copy of CL_Benchmark lacks it (see its README, known gaps); get {info.benchmark}/{info.name}/"
            f"{split}.json from {_SOURCE}, or leave {info.name} out of the task order",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CLScaleError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}",
            f"the file is damaged; get it again from {_SOURCE}",
        ) from err
    instances = data.get("Instances") if isinstance(data, dict) else None
    if not isinstance(instances, list):
        raise CLScaleError(f"{path} has no 'Instances' list", "use the CL_Benchmark JSON layout")
    if not instances:
        raise CLScaleError(f"{path} holds no instances", f"the split is empty; get it again from {_SOURCE}")
    definitions = data.get("Definition") or [""]
    return (definitions if isinstance(definitions, str) else definitions[0]), instances


def _references(path: Path, index: int, instance: Any) -> list[str]:
    """All reference answers of one instance (SuperNI lists, Long_Sequence strings)."""
    output = instance.get("output") if isinstance(instance, dict) else None
    refs = [output] if isinstance(output, str) else output
    valid = isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)
    if not valid or not isinstance(instance.get("input"), str):
        raise CLScaleError(
            f"{path}: instance {index} needs a string 'input' and an 'output' string or non-empty list of strings",
            "fix or remove that instance",
        )
    return refs


def load_examples(
    root: str | Path, task: str, split: str, *, max_examples: int | None = None, seed: int = 0
) -> Dataset:
    """One split as examples (id, task, definition, input, references, target).

    `max_examples` keeps a seeded subset in file order. Ids come from the file where it has them
    (SuperNI), else `<task>-<split>-<index>`; the target among several references is drawn per example id.
    """
    info = find_task(root, task)
    definition, instances = read_instances(info, split)
    path = split_file(info, split)
    columns: dict[str, list] = {name: [] for name in ("id", "task", "definition", "input", "references", "target")}
    for index in subset_indices(len(instances), max_examples, seed):
        instance = instances[index]
        refs = _references(path, index, instance)
        example_id = str(instance.get("id") or f"{task}-{split}-{index}")
        columns["id"].append(example_id)
        columns["input"].append(instance["input"])
        columns["references"].append(refs)
        columns["target"].append(draw_target(refs, example_id, seed))
    columns["task"] = [task] * len(columns["id"])
    columns["definition"] = [definition] * len(columns["id"])
    return make_examples(columns)


def count_examples(info: TaskInfo, split: str) -> int:
    """How many instances a split holds (raises like `load_examples` when it cannot be read)."""
    return len(read_instances(info, split)[1])
