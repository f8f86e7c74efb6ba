"""`cl-scale generate`: answer a user's prompts with the model after stage K, no task id needed.

Prompts come whole or as definition + input lines built with the run's template, and are tokenised and
truncated like test prompts. Every rank answers together (generation is collective under ZeRO-3); rank 0
prints a table on a terminal or one JSON object per prompt for pipes and files, with GainLoRA's gate
coefficients beside each answer.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cl_scale import distributed as dist_utils
from cl_scale.continual_state import load_stage_model, open_run_recipe, resolve_stage
from cl_scale.data.pipeline import tokenize_examples
from cl_scale.data.prompts import build_prompt
from cl_scale.data.tasks import prompt_template
from cl_scale.errors import CLScaleError
from cl_scale.evaluation.gates import gate_coefficients, is_gated
from cl_scale.evaluation.generation import generate_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cl_scale.data.pipeline import TaskRows
    from cl_scale.recipe import Recipe
    from cl_scale.rundir import RunDir

_FORMAT = 'each line must be {"prompt": "..."} or {"definition": "...", "input": "..."}'


def _template(recipe: Recipe, tasks: list[str]) -> str:
    """The run's prompt template: the one every task of the run uses (own tasks may bring their own)."""
    templates = {prompt_template(recipe.data, task) for task in tasks}
    if len(templates) != 1:
        raise CLScaleError(
            f"the run's tasks use {len(templates)} different prompt templates (benchmarks or own tasks differ)",
            'give whole prompts as {"prompt": "..."} lines',
        )
    return templates.pop()


def _line_prompt(path: Path, number: int, line: str, template: Callable[[], str]) -> str:
    """The prompt of one JSONL line; `template` is called only when the line needs it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise CLScaleError(f"{path} line {number} is not JSON ({err.msg})", _FORMAT) from err
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row, dict) and isinstance(row.get("input"), str) and isinstance(row.get("definition", ""), str):
        return build_prompt(row.get("definition", ""), row["input"], template())
    raise CLScaleError(f"{path} line {number} has no prompt", _FORMAT)


def read_prompts(input_path: Path | None, prompt: str | None, recipe: Recipe, tasks: list[str]) -> list[str]:
    """`prompt` as is, or one prompt per non-empty line of the JSONL file `input_path`."""
    if prompt is not None:
        return [prompt]
    if input_path is None:
        raise CLScaleError("no prompt given", "pass --prompt TEXT or --input FILE.jsonl")
    if not input_path.is_file():
        raise CLScaleError(f"input file {input_path} does not exist", "check the path given to --input")
    lines = [(n, line) for n, line in enumerate(input_path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise CLScaleError(f"input file {input_path} holds no prompts", _FORMAT)
    return [_line_prompt(input_path, n, line, lambda: _template(recipe, tasks)) for n, line in lines]


def prompt_rows(prompts: list[str], tokenizer: PreTrainedTokenizerBase, kind: str, recipe: Recipe) -> TaskRows:
    """TaskRows of bare prompts, tokenised and truncated exactly like test prompts (no references)."""
    from datasets import Dataset

    examples = Dataset.from_dict({"id": [f"input-{i}" for i in range(len(prompts))], "prompt": prompts})
    return tokenize_examples(recipe.data, tokenizer, kind, examples, prompts_only=True)


def _shorten(text: str, width: int = 120) -> str:
    """The end of a long prompt, where the input and the answer cue are."""
    return text if len(text) <= width else "…" + text[-width:]


def _print_answers(prompts: list[str], answers: list[str], gates: dict[str, list[float]] | None) -> None:
    """A table on a terminal; one JSON object per prompt otherwise (for pipes and files)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = [
        {"prompt": p, "answer": a, **({} if gates is None else {"gates": {t: c[i] for t, c in gates.items()}})}
        for i, (p, a) in enumerate(zip(prompts, answers))
    ]
    if not console.is_terminal:
        sys.stdout.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    table = Table(title="Answers" + ("" if gates is None else " and gate coefficients"))
    for name in ("#", "prompt", "answer", *(f"gate {t}" for t in gates or {})):
        table.add_column(name, justify="right" if name.startswith("gate") else "left")
    for number, row in enumerate(rows, 1):
        coefs = [f"{v:.3f}" for v in row.get("gates", {}).values()]
        table.add_row(str(number), _shorten(row["prompt"]), row["answer"], *coefs)
    console.print(table)


def _answer(
    run: RunDir, recipe: Recipe, index: int, prompts: list[str]
) -> tuple[list[str], dict[str, list[float]] | None, bool]:
    """Answers to `prompts` after stage `index`, each task's gate coefficients (GainLoRA), and whether on rank 0."""
    batch = recipe.eval.batch_size
    with dist_utils.process_group(recipe.train.collective_timeout_s), load_stage_model(recipe, run, index) as loaded:
        rows = prompt_rows(prompts, loaded.tokenizer, loaded.kind, recipe)
        answers = generate_texts(
            loaded.engine, rows, loaded.tokenizer, batch_size=batch, max_new_tokens=recipe.eval.max_new_tokens
        )
        coefs = gate_coefficients(loaded.engine, rows, batch_size=batch) if is_gated(loaded.model) else None
        main = dist_utils.is_main()
    gates = None if coefs is None else {task: coefs[:, i].tolist() for i, task in enumerate(run.tasks[: index + 1])}
    return answers, gates, main


def generate_cli(run_dir: Path, *, stage: int | None, input_path: Path | None, prompt: str | None) -> None:
    """Answer prompts with the model after stage K (default: the last finished), no task id; GainLoRA's gates shown."""
    run, recipe = open_run_recipe(run_dir)
    index = resolve_stage(run, stage)
    prompts = read_prompts(input_path, prompt, recipe, run.tasks)
    with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the answers on stdout
        answers, gates, main = _answer(run, recipe, index, prompts)
    if main:
        _print_answers(prompts, answers, gates)
