"""The trainer's single door to task data: benchmark folder, own files or built-in suite, capped, with prompts."""

from __future__ import annotations

from typing import Literal, Protocol

from datasets import Dataset

from cl_scale.data.benchmark import TaskInfo, find_task, load_examples, split_file
from cl_scale.data.names import unknown_name
from cl_scale.data.own_tasks import (
    OWN_BENCHMARK,
    TaskFiles,
    check_own_task,
    load_own_examples,
)
from cl_scale.data.prompts import build_prompt, resolve_template
from cl_scale.data.synthetic import (
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    SYNTHETIC_BENCHMARK,
    SYNTHETIC_TASKS,
    load_synthetic,
)
from cl_scale.errors import CLScaleError

SYNTHETIC_ROOT = "builtin:synthetic"


class DataConfig(Protocol):
    """The recipe's data section, as far as data loading reads it."""

    root: str
    order: str | None
    tasks: list[str | TaskFiles] | None
    template: str
    chat_template: bool
    trailing_space: Literal["prompt", "answer"]
    max_source_length: int
    max_target_length: int
    max_train_examples: int | None
    max_eval_examples: int | None


def task_info(data_cfg: DataConfig, task: str) -> TaskInfo:
    """Where `task` comes from; its `benchmark` picks the prompt format and the metric.

    An own task of `data.tasks` is found by its name before any folder, so it needs no benchmark copy.
    """
    own = [entry for entry in data_cfg.tasks or () if not isinstance(entry, str) and entry.name == task]
    if own:
        return TaskInfo(task, OWN_BENCHMARK, None, files=own[0])
    if data_cfg.root == SYNTHETIC_ROOT:
        if task not in SYNTHETIC_TASKS:
            raise unknown_name("synthetic task", task, SYNTHETIC_TASKS)
        return TaskInfo(task, SYNTHETIC_BENCHMARK, None)
    return find_task(data_cfg.root, task)


def prompt_template(data_cfg: DataConfig, task: str) -> str:
    """The prompt template `task` uses: an own task's `template`, else data.template, "auto" resolved
    through the task's benchmark."""
    info = task_info(data_cfg, task)
    own = None if info.files is None else info.files.template
    return resolve_template(own or data_cfg.template, info.benchmark)


def load_task(data_cfg: DataConfig, task: str, split: str, *, seed: int) -> Dataset:
    """Examples of one split with a `prompt` column.

    The cap is max_train_examples for "train" and max_eval_examples for dev/test. For the built-in suite
    the caps are the generated sizes and `seed` is the data seed: pass the same seed for every task so the
    shared-input tasks really share inputs.
    """
    info = task_info(data_cfg, task)
    if info.benchmark == SYNTHETIC_BENCHMARK:
        ds = load_synthetic(
            task,
            split,
            n_train=data_cfg.max_train_examples or DEFAULT_N_TRAIN,
            n_test=data_cfg.max_eval_examples or DEFAULT_N_TEST,
            seed=seed,
        )
    else:
        cap = data_cfg.max_train_examples if split == "train" else data_cfg.max_eval_examples
        if info.files is not None:
            ds = load_own_examples(info.files, split, max_examples=cap, seed=seed)
        else:
            ds = load_examples(data_cfg.root, task, split, max_examples=cap, seed=seed)
    template = prompt_template(data_cfg, task)
    prompts = [build_prompt(d, x, template) for d, x in zip(ds["definition"], ds["input"])]
    return ds.add_column("prompt", prompts)


def check_tasks(data_cfg: DataConfig, tasks: list[str], splits: tuple[str, ...] = ("train", "test")) -> None:
    """Fail before anything is written if a task is unknown or one of its needed split files is missing;
    own tasks have every record of every split they name checked."""
    for task in tasks:
        info = task_info(data_cfg, task)
        if info.files is not None:
            check_own_task(info.files)
            continue
        if info.path is None:
            continue
        for split in splits:
            path = split_file(info, split)
            if not path.is_file():
                raise CLScaleError(
                    f"task {task}: {path} is missing",
                    "complete the CL_Benchmark copy (public O-LoRA / GainLoRA repositories) or drop the task from the order",
                )
