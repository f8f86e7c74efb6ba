"""Prompts a user brings to `cl-scale generate`: read, built with the run's template, tokenised like test prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cl_scale.errors import CLScaleError

_FORMAT = 'each line must be {"prompt": "..."} or {"definition": "...", "input": "..."}'


def _template(recipe: Any, tasks: list[str]) -> str:
    """The run's prompt template; "auto" resolves through the benchmark the run's tasks come from."""
    from cl_scale.data.prompts import resolve_template
    from cl_scale.data.tasks import task_info

    if recipe.data.template != "auto":
        return recipe.data.template
    benchmarks = {task_info(recipe.data, task).benchmark for task in tasks}
    if len(benchmarks) != 1:
        raise CLScaleError(
            f"the run's tasks come from several benchmarks ({', '.join(sorted(benchmarks))}) "
            "with different prompt formats",
            'give whole prompts as {"prompt": "..."} lines',
        )
    return resolve_template("auto", benchmarks.pop())


def _line_prompt(path: Path, number: int, line: str, template: Any) -> str:
    """The prompt of one JSONL line; `template` is called only when the line needs it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise CLScaleError(f"{path} line {number} is not JSON ({err.msg})", _FORMAT) from err
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row, dict) and isinstance(row.get("input"), str) and isinstance(row.get("definition", ""), str):
        from cl_scale.data.prompts import build_prompt

        return build_prompt(row.get("definition", ""), row["input"], template())
    raise CLScaleError(f"{path} line {number} has no prompt", _FORMAT)


def read_prompts(input_path: Path | None, prompt: str | None, recipe: Any, tasks: list[str]) -> list[str]:
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


def prompt_rows(prompts: list[str], tokenizer: Any, kind: str, recipe: Any) -> Any:
    """TaskRows of bare prompts, tokenised and truncated exactly like test prompts (no references)."""
    from datasets import Dataset

    from cl_scale.data.pipeline import tokenize_examples

    examples = Dataset.from_dict({"id": [f"input-{i}" for i in range(len(prompts))], "prompt": prompts})
    return tokenize_examples(recipe, tokenizer, kind, examples, prompts_only=True)
