"""`cl-scale data list` and `cl-scale data check`: what the data holds and what tokenisation will cut.

Above `data/` (it loads tokenizers and built-in models through `modeling/`), so `data/` imports nothing above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cl_scale.builtin.specs import BUILTIN_PREFIX
from cl_scale.data.benchmark import SPLITS, TaskInfo, count_examples, default_metric, list_tasks, split_file
from cl_scale.data.lengths import LengthStats, token_length_stats
from cl_scale.data.orders import resolve_tasks
from cl_scale.data.synthetic import DEFAULT_N_TEST, DEFAULT_N_TRAIN, SYNTHETIC_BENCHMARK, SYNTHETIC_TASKS
from cl_scale.data.own_tasks import own_split_size, split_path
from cl_scale.data.tasks import SYNTHETIC_ROOT, load_task, task_info
from cl_scale.errors import CLScaleError

if TYPE_CHECKING:
    from cl_scale.recipe import ModelConfig, Recipe


def _split_size(info: TaskInfo, split: str, synthetic_sizes: tuple[int, int]) -> str:
    """The instance count, or a red word saying why there is none; built-in tasks have the sizes asked for."""
    if info.benchmark == SYNTHETIC_BENCHMARK:
        return str(synthetic_sizes[0] if split == "train" else synthetic_sizes[1])
    if info.files is not None:
        try:
            size = own_split_size(info.files, split)
        except CLScaleError:
            return "[red]unreadable[/red]"
        return "none" if size is None else str(size)
    if not split_file(info, split).is_file():
        return "[red]missing[/red]"
    try:
        return str(count_examples(info, split))
    except CLScaleError:
        return "[red]unreadable[/red]"


def _sizes_table(infos: list[TaskInfo], synthetic_sizes: tuple[int, int]) -> Table:
    table = Table(title="Tasks and split sizes")
    for column in ("benchmark", "task", *SPLITS, "metric"):
        table.add_column(column, justify="right" if column in SPLITS else "left", overflow="fold")
    for info in infos:
        sizes = (_split_size(info, s, synthetic_sizes) for s in SPLITS)
        table.add_row(info.benchmark, info.name, *sizes, default_metric(info))
    return table


def list_tasks_cli(root: str) -> None:
    """Print every task under `root` (or the built-in suite) with its split sizes and metric."""
    if root == SYNTHETIC_ROOT:
        infos = [TaskInfo(name, SYNTHETIC_BENCHMARK, None) for name in SYNTHETIC_TASKS]
    else:
        infos = list_tasks(root)
    Console().print(_sizes_table(infos, (DEFAULT_N_TRAIN, DEFAULT_N_TEST)))


def _recipe_tokenizer(model_cfg: ModelConfig) -> tuple[PreTrainedTokenizerBase | None, str]:
    """The recipe's tokenizer, or None and the reason: the report still helps without one."""
    try:
        if model_cfg.path.startswith(BUILTIN_PREFIX):
            # Here, not at the top: loading brings transformers' model classes and the built-in factory,
            # which `cl-scale data list` and `data check` of other models never need.
            from cl_scale.modeling.loading import load_tokenizer

            return load_tokenizer(model_cfg), ""
        return AutoTokenizer.from_pretrained(model_cfg.path), ""
    except Exception as err:  # any failure only downgrades the report to word counts
        return None, f"tokenizer of {model_cfg.path} unavailable ({err}); lengths below are whitespace word counts"


def _stats_cells(stats: LengthStats) -> list[str]:
    p, a = stats.prompt, stats.answer
    return [
        str(stats.n),
        f"{p.p50}/{p.p90}/{p.p99}/{p.max}",
        f"{a.p50}/{a.p90}/{a.p99}/{a.max}",
        f"[red]{stats.truncated_prompts}[/red]" if stats.truncated_prompts else "0",
        f"[red]{stats.truncated_answers}[/red]" if stats.truncated_answers else "0",
    ]


def check_recipe_cli(recipe: Recipe) -> None:
    """Print split sizes and prompt/answer lengths of every task of a recipe, and how many would be cut."""
    data = recipe.data
    tasks = resolve_tasks(data.order, data.tasks)
    console = Console()
    synthetic_sizes = (data.max_train_examples or DEFAULT_N_TRAIN, data.max_eval_examples or DEFAULT_N_TEST)
    console.print(_sizes_table([task_info(data, t) for t in tasks], synthetic_sizes))
    tokenizer, note = _recipe_tokenizer(recipe.model)
    if note:
        console.print(f"[yellow]{note}[/yellow]")
    unit = "words" if tokenizer is None else "tokens"
    table = Table(
        title=f"Lengths in {unit} (p50/p90/p99/max), limits {data.max_source_length} prompt / "
        f"{data.max_target_length} answer"
    )
    for column in ("task", "split", "examples", "prompt", "answer", "prompts cut", "answers cut"):
        table.add_column(column, overflow="fold")
    for task in tasks:
        info = task_info(data, task)
        for split in SPLITS:
            if info.path is not None and not split_file(info, split).is_file():
                table.add_row(task, split, "[red]missing[/red]", "", "", "", "")
                continue
            if info.files is not None and split_path(info.files, split) is None:
                table.add_row(task, split, "none", "", "", "", "")  # an own task without a dev split
                continue
            try:
                ds = load_task(data, task, split, seed=recipe.train.seed)
            except CLScaleError as err:
                table.add_row(task, split, f"[red]{err.problem}[/red]", "", "", "", "")
                continue
            stats = token_length_stats(
                ds, tokenizer, max_source_length=data.max_source_length, max_target_length=data.max_target_length
            )
            table.add_row(task, split, *_stats_cells(stats))
    console.print(table)
