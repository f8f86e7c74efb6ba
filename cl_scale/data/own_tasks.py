"""Tasks from the user's own files: JSON (records or CL_Benchmark `Instances`), JSONL, CSV/TSV, Parquet,
Arrow, or a Hugging Face dataset saved with `save_to_disk`, each split read through `datasets`.

Every record is checked before anything is trained or written, and every defect becomes one CLScaleError
that names the file and, where it applies, the record (and the line of a JSONL file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

from datasets import Dataset, DatasetDict

from cl_scale.data.examples import draw_target, make_examples, subset_indices
from cl_scale.errors import CLScaleError, read_json

OWN_BENCHMARK = "own files"
OWN_SPLITS = ("train", "dev", "test")
# How a split file is read, by its suffix: the `datasets` builder and its options.
_BUILDERS: dict[str, tuple[str, dict]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
# A DatasetDict saved to disk may call the dev split "validation".
_DISK_SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "validation"), "test": ("test",)}


class TaskFiles(Protocol):
    """One own task of the recipe (`data.tasks` entry written as a mapping)."""

    name: str
    train: str
    dev: str | None
    test: str
    input_field: str
    output_field: str
    instruction: str | None
    metric: Literal["rouge", "exact"]
    template: str | None


def split_path(spec: TaskFiles, split: str) -> Path | None:
    """The file or folder of one split; None for a dev split the task does not name."""
    if split not in OWN_SPLITS:
        raise CLScaleError(f"unknown split {split!r} of task {spec.name}", f"use one of {', '.join(OWN_SPLITS)}")
    value = getattr(spec, split)
    return None if value is None else Path(value).expanduser()


def _fields(spec: TaskFiles) -> str:
    return f"input_field `{spec.input_field}` and output_field `{spec.output_field}`"


def _read(spec: TaskFiles, split: str, path: Path) -> tuple[Dataset, str]:
    """The raw records of a split and the definition the file carries ("" when none)."""
    if path.is_dir():
        return _read_disk(spec, split, path), ""
    if not path.is_file():
        raise CLScaleError(
            f"task {spec.name}: {split} file {path} not found",
            f"set data.tasks[{spec.name}].{split} to an existing file (paths are relative to the working directory)",
        )
    if path.suffix.lower() not in _BUILDERS:
        raise CLScaleError(
            f"task {spec.name}: {path} has a suffix cl-scale cannot read",
            f"use one of {', '.join(_BUILDERS)}, or a folder written by Dataset.save_to_disk",
        )
    if not path.read_bytes().strip():
        raise CLScaleError(f"task {spec.name}: {path} is empty (no records in the {split} split)", "fill the file")
    builder, options = _BUILDERS[path.suffix.lower()]
    definition = ""
    if builder == "csv":
        # Every CSV cell a string, an empty cell "" (not NaN): labels like 1 or "None" stay answers.
        as_text = {spec.input_field: str, spec.output_field: str}
        options = {**options, "converters": as_text, "keep_default_na": False}
    elif path.suffix.lower() == ".json" and _first_character(path) == "{":
        definition, options = _benchmark_layout(spec, path), {"field": "Instances"}
    import datasets

    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True, **options)
    except Exception as err:  # datasets raises many kinds; all mean the file cannot be read as that format
        if "corresponds to no data" in str(err):  # datasets' word for a split without records
            raise CLScaleError(f"task {spec.name}: {path} holds no records (the {split} split is empty)", "fill the split") from err
        cause = err.__cause__ or err
        raise CLScaleError(
            f"task {spec.name}: {path} cannot be read as {builder.upper()}: {cause}",
            "fix the file (for JSONL: one JSON object per line)",
        ) from err
    return loaded, definition


def _first_character(path: Path) -> str:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                return line.strip()[0]
    return ""


def _benchmark_layout(spec: TaskFiles, path: Path) -> str:
    """For a JSON object file: its first `Definition`; it must be CL_Benchmark's layout with `Instances`."""
    data = read_json(path, fix="fix the JSON, or write the split as a list of records or as JSONL")
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list):
        raise CLScaleError(
            f"task {spec.name}: {path} is a JSON object without an `Instances` list",
            "write the split as a list of records, as JSONL, or in CL_Benchmark's layout {\"Instances\": [...]}",
        )
    definitions = data.get("Definition") or [""]
    return definitions if isinstance(definitions, str) else str(definitions[0])


def _read_disk(spec: TaskFiles, split: str, path: Path) -> Dataset:
    """A folder written by Dataset.save_to_disk, or DatasetDict.save_to_disk (its split of that name)."""
    from datasets import load_from_disk

    try:
        loaded = load_from_disk(str(path), keep_in_memory=True)
    except Exception as err:  # not a saved dataset: FileNotFoundError or datasets' own errors
        raise CLScaleError(
            f"task {spec.name}: {path} is a folder but not a dataset saved with save_to_disk ({err})",
            "point the split at a file, or at a folder written by Dataset.save_to_disk",
        ) from err
    if isinstance(loaded, DatasetDict):
        names = [name for name in _DISK_SPLIT_NAMES[split] if name in loaded]
        if not names:
            raise CLScaleError(
                f"task {spec.name}: the saved DatasetDict {path} has no {split} split (it has {', '.join(loaded)})",
                f"save a {' or '.join(_DISK_SPLIT_NAMES[split])} split, or point {split} at another file",
            )
        return loaded[names[0]]
    return loaded


def _locator(path: Path, builder_suffix: str, count: int) -> list[str]:
    """How record i is named in messages: its line in a JSONL file, its row in a CSV, else its number."""
    if builder_suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as handle:
            lines = [number for number, text in enumerate(handle, 1) if text.strip()]
        if len(lines) == count:
            return [f"record {i + 1} (line {line})" for i, line in enumerate(lines)]
    if builder_suffix in (".csv", ".tsv"):
        return [f"row {i + 1} after the header" for i in range(count)]
    return [f"record {i + 1}" for i in range(count)]


def _check_columns(spec: TaskFiles, path: Path, records: Dataset) -> None:
    missing = [f for f in (spec.input_field, spec.output_field) if f not in records.column_names]
    if not missing:
        return
    have = ", ".join(records.column_names) or "none"
    if path.suffix.lower() in (".csv", ".tsv"):
        raise CLScaleError(
            f"task {spec.name}: {path} has no column {', '.join(repr(m) for m in missing)} in its header "
            f"(the first line gives the columns {have}; a CSV without a header line reads its first record as one)",
            f"start the file with a header line naming the columns, or set the task's {_fields(spec)}",
        )
    raise CLScaleError(
        f"task {spec.name}: no record of {path} has the field {', '.join(repr(m) for m in missing)} "
        f"(fields found: {have})",
        f"set the task's {_fields(spec)} to the file's field names",
    )


def _references(spec: TaskFiles, path: Path, where: str, value: object) -> list[str]:
    refs = [value] if isinstance(value, str) else value
    if isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs):
        return refs
    if value is None:
        problem = f"has no `{spec.output_field}`"
    elif isinstance(value, list):
        problem = f"has `{spec.output_field}` as {'an empty list' if not value else 'a list with a non-string'}"
    else:
        problem = f"has `{spec.output_field}` of type {type(value).__name__}"
    raise CLScaleError(
        f"task {spec.name}: {path} {where} {problem}; the answer must be a string or a non-empty list of strings",
        "fix or remove that record",
    )


def _input(spec: TaskFiles, path: Path, where: str, value: object) -> str:
    if isinstance(value, str):
        return value
    problem = f"has no `{spec.input_field}`" if value is None else (
        f"has `{spec.input_field}` of type {type(value).__name__}, not a string"
    )
    raise CLScaleError(f"task {spec.name}: {path} {where} {problem}", "fix or remove that record")


def load_own_examples(spec: TaskFiles, split: str, *, max_examples: int | None = None, seed: int = 0) -> Dataset:
    """One split as examples (id, task, definition, input, references, target), every record checked.

    The instruction is the task's `instruction`, else the file's CL_Benchmark `Definition`, else "".
    Ids are the records' `id` where they have one, else `<task>-<split>-<index>`; `max_examples` keeps a
    seeded subset in file order, and the target among several references is drawn per id (as for CL_Benchmark).
    """
    path = split_path(spec, split)
    if path is None:
        raise CLScaleError(f"task {spec.name} has no {split} split", f"add `{split}:` to the task in data.tasks")
    records, file_definition = _read(spec, split, path)
    if len(records) == 0:
        raise CLScaleError(f"task {spec.name}: {path} holds no records (the {split} split is empty)", "fill the split")
    _check_columns(spec, path, records)
    where = _locator(path, path.suffix.lower(), len(records))
    inputs = [_input(spec, path, where[i], v) for i, v in enumerate(records[spec.input_field])]
    refs = [_references(spec, path, where[i], v) for i, v in enumerate(records[spec.output_field])]
    ids = records["id"] if "id" in records.column_names else [None] * len(records)
    keep = subset_indices(len(records), max_examples, seed)
    example_ids = [str(ids[i]) if ids[i] not in (None, "") else f"{spec.name}-{split}-{i}" for i in keep]
    definition = spec.instruction if spec.instruction is not None else file_definition
    return make_examples({
        "id": example_ids,
        "task": [spec.name] * len(keep),
        "definition": [definition] * len(keep),
        "input": [inputs[i] for i in keep],
        "references": [refs[i] for i in keep],
        "target": [draw_target(refs[i], eid, seed) for i, eid in zip(keep, example_ids)],
    })


def check_own_task(spec: TaskFiles) -> None:
    """Read and check every record of every split the task names (train and test always)."""
    for split in OWN_SPLITS:
        if split_path(spec, split) is not None:
            load_own_examples(spec, split)


def own_split_size(spec: TaskFiles, split: str) -> int | None:
    """Records in a split; None when the task names no such split."""
    return None if split_path(spec, split) is None else len(load_own_examples(spec, split))

