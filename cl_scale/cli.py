"""The `cl-scale` command: parse, validate, dispatch. No training logic lives here.

Every command imports its worker lazily, so `cl-scale --help` and recipe errors never wait for torch
or DeepSpeed to load.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import click
import typer
from typer.core import TyperGroup

from cl_scale.errors import REQUEUE_EXIT, CLScaleError, StopRequested

if TYPE_CHECKING:
    from rich.console import Console

    from cl_scale.recipe import Recipe


class _Group(TyperGroup):
    """Root group that turns a CLScaleError into one red message and exit code 2 (unless --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CLScaleError as error:
            if ctx.params.get("debug"):
                raise
            _print_error(error)
            ctx.exit(2)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            _stderr().print("[red]interrupted[/red]")
            ctx.exit(130)
        except StopRequested:
            ctx.exit(REQUEUE_EXIT)  # the trainer has said what it saved


def _stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _print_error(error: CLScaleError) -> None:
    from rich.markup import escape

    console = _stderr()
    # soft_wrap: no hard line breaks inside the message, so logs and greps see it whole.
    console.print(f"[bold red]error:[/bold red] [red]{escape(error.problem)}[/red]", highlight=False, soft_wrap=True)
    if error.fix:
        console.print(f"[bold]fix:[/bold] {escape(error.fix)}", highlight=False, soft_wrap=True)


app = typer.Typer(
    cls=_Group,
    name="cl-scale",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
recipe_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect benchmark data: available tasks, splits, sizes, truncation.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full Python traceback instead of a one-line error.")
    ] = False,
) -> None:
    """Continual learning of LLMs with LoRA-branch methods on DeepSpeed ZeRO-3.

    Example: cl-scale train recipes/demo.yaml --set train.lr=1e-4
    """


# Shared argument types: every command that takes a recipe takes overrides the same two ways.
RecipeArg = Annotated[
    Path, typer.Argument(help="YAML recipe file, e.g. recipes/demo.yaml.", show_default=False)
]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        help="Overrides as dotted.key=value words after the recipe, e.g. train.lr=1e-4 method.rank=4. "
        "Values follow YAML rules: 1e-4 is a number, true a bool, \\[a,b] a list, null nothing.",
        metavar="KEY=VALUE",
        show_default=False,
    ),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        "-s",
        help="Override one recipe value, dotted.key=value (repeatable); applied after the bare overrides.",
        metavar="KEY=VALUE",
        show_default=False,
    ),
]


def _recipe(path: Path, words: Sequence[str] | None, sets: Sequence[str] | None) -> Recipe:
    """Load and validate a recipe with overrides from both forms: bare words first, then --set."""
    from cl_scale.recipe import load_recipe

    return load_recipe(path, [*(words or ()), *(sets or ())])


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, overrides: OverridesArg = None, set_: SetOption = None) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied) as YAML.

    Example: cl-scale recipe show recipes/demo.yaml train.lr=1e-4 --set method.name=seqlora
    """
    from rich.console import Console

    from cl_scale.recipe import recipe_to_yaml

    text = recipe_to_yaml(_recipe(recipe, overrides, set_))
    console = Console()
    if console.is_terminal:
        from rich.syntax import Syntax

        console.print(Syntax(text, "yaml", background_color="default"))
    else:
        sys.stdout.write(text)


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    set_: SetOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an existing run at its first unfinished stage instead of refusing to overwrite it.",
        ),
    ] = False,
    run_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--run-dir",
            help="Run directory to write (or resume); default <output.dir>/<name> from the recipe.",
            show_default=False,
        ),
    ] = None,
    allow_changed_recipe: Annotated[
        bool,
        typer.Option(
            "--allow-changed-recipe",
            help="With --resume, continue even if the recipe differs from the one saved in the run directory.",
        ),
    ] = False,
) -> None:
    """Train the whole task sequence, evaluating each stage; writes a resumable run directory.

    Example: cl-scale train recipes/demo.yaml --set method.name=seqlora
    Several GPUs: deepspeed --num_gpus 8 $(which cl-scale) train recipes/llama7b_order1.yaml
    """
    loaded = _recipe(recipe, overrides, set_)
    from cl_scale.trainer import run_training

    run_training(loaded, resume=resume, run_dir=run_dir, allow_changed_recipe=allow_changed_recipe)


RunDirArg = Annotated[
    Path, typer.Argument(help="A run directory written by `cl-scale train`, e.g. runs/demo.", show_default=False)
]


@app.command()
def demo(
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods to compare (seqlora, inclora, olora, nlora, inflora, gainlora).")
    ] = "seqlora,gainlora",
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the demo's run directories go.")] = Path("runs"),
) -> None:
    """The built-in CPU demo: a small model learns 4 synthetic tasks in sequence with each method.

    Shows forgetting (SeqLoRA) and how GainLoRA prevents it, as a table of AP / FT / BWT and heat maps.
    Finished runs are reused; an interrupted one resumes. Example: cl-scale demo --methods seqlora,olora,gainlora
    """
    from cl_scale.demo import run_demo

    run_demo([m.strip() for m in methods.split(",") if m.strip()], out_dir)


@app.command("eval")
def eval_(
    run_dir: RunDirArg,
    compare: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--compare",
            help="Another run directory to compare against (repeatable); prints AP/FT/BWT side by side.",
            metavar="RUN",
            show_default=False,
        ),
    ] = None,
    max_examples: Annotated[
        Optional[int],
        typer.Option(
            "--max-examples",
            min=1,
            help="Quick look: score cells not yet evaluated on at most N test examples per task; results go to "
            "RUN/quick-look/, never into stages/ or the run's matrix files.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Evaluate a run: fill missing cells of the stage x task matrix, report AP, FT and BWT.

    Example: cl-scale eval runs/demo --compare runs/demo_seqlora
    """
    from cl_scale.evaluation.runner import compare_runs, evaluate_run

    if compare:
        compare_runs([run_dir, *compare], max_examples=max_examples)
    else:
        evaluate_run(run_dir, max_examples=max_examples)


@app.command()
def generate(
    run_dir: RunDirArg,
    stage: Annotated[
        Optional[int],
        typer.Option(
            "--stage",
            min=1,
            help="Use the model after stage K (1-based); default the last finished stage.",
            show_default=False,
        ),
    ] = None,
    input_: Annotated[
        Optional[Path],
        typer.Option(
            "--input",
            help='JSONL file, one {"prompt": ...} or {"definition": ..., "input": ...} per line; '
            "a table on a terminal, JSONL when piped.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        Optional[str], typer.Option("--prompt", help="A single prompt to answer.", show_default=False)
    ] = None,
) -> None:
    """Answer prompts with a trained run; the gates pick the task, no task id needed.

    Example: cl-scale generate runs/demo --prompt "Is this review positive? Great film."
    """
    if (input_ is None) == (prompt is None):
        raise CLScaleError("give exactly one of --input FILE.jsonl or --prompt TEXT", "e.g. --prompt \"Hello\"")
    from cl_scale.generate import generate_cli

    generate_cli(run_dir, stage=stage, input_path=input_, prompt=prompt)


@app.command()
def export(
    run_dir: RunDirArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write (must be empty or absent).", show_default=False)],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="peft: one standard PEFT LoRA adapter of rank K·r holding every task's branch (PeftModel, vLLM "
            "--enable-lora), methods without gates. merged: the base with every branch folded into its weights, "
            "a plain transformers checkpoint with its tokenizer, methods without gates. gated: GainLoRA's per-task "
            "PEFT adapters, gate bank and JSON config, loaded by cl_scale.load_exported (docs/export.md).",
        ),
    ] = "peft",
    stage: Annotated[
        Optional[int],
        typer.Option("--stage", min=1, help="Export the model after stage K (1-based); default the last finished stage.",
                     show_default=False),
    ] = None,
    per_task: Annotated[
        bool, typer.Option("--per-task", help="With --format peft: write each task's branch as its own adapter.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
    shard_mb: Annotated[
        Optional[int],
        typer.Option("--shard-mb", min=1, help="With --format merged: largest safetensors shard, in MB (default 500).",
                     show_default=False),
    ] = None,
) -> None:
    """Write a trained stage as PEFT adapters, merged weights or (GainLoRA) a gated package.

    Example: cl-scale export runs/demo_inclora --out exports/inclora --format peft
    A model that only fits sharded (merged, module by module under ZeRO-3):
    deepspeed --num_gpus 8 $(which cl-scale) export runs/llama13b --out exports/l13 --format merged
    """
    from cl_scale.export import export_cli

    export_cli(run_dir, out, stage=stage, fmt=format_, per_task=per_task, force=force, shard_mb=shard_mb)


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    set_: SetOption = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs per node the run will use.")] = 1,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Number of nodes the run will use.")] = 1,
) -> None:
    """Check a recipe before a long run: trainable parameters per task, memory estimate, batch arithmetic.

    Example: cl-scale plan recipes/llama13b_order2.yaml --gpus 8 --nodes 2
    """
    loaded = _recipe(recipe, overrides, set_)
    from cl_scale.plan import plan_cli

    plan_cli(loaded, gpus=gpus, nodes=nodes, recipe_path=str(recipe), overrides=[*(overrides or []), *(set_ or [])])


@data_app.command("list")
def data_list(
    root: Annotated[
        str, typer.Argument(help="Benchmark root (CL_Benchmark layout) or builtin:synthetic.", show_default=False)
    ],
) -> None:
    """List the tasks found under a benchmark root and the named orders they complete.

    Example: cl-scale data list ../shared/CL_Benchmark
    """
    from cl_scale.data_check import list_tasks_cli

    list_tasks_cli(root)


@data_app.command("check")
def data_check(recipe: RecipeArg, overrides: OverridesArg = None, set_: SetOption = None) -> None:
    """Check a recipe's tasks: splits present, sizes, token lengths and how much gets truncated.

    Example: cl-scale data check recipes/demo.yaml data.max_source_length=256
    """
    loaded = _recipe(recipe, overrides, set_)
    from cl_scale.data_check import check_recipe_cli

    check_recipe_cli(loaded)


def strip_local_rank(args: Sequence[str]) -> tuple[list[str], str | None]:
    """Remove the `--local_rank=N` / `--local_rank N` the DeepSpeed launcher appends; return it too."""
    kept: list[str] = []
    rank: str | None = None
    index = 0
    while index < len(args):
        word = args[index]
        if word.startswith("--local_rank="):
            rank = word.partition("=")[2]
        elif word == "--local_rank" and index + 1 < len(args) and args[index + 1].isdigit():
            rank = args[index + 1]
            index += 1
        else:
            kept.append(word)
        index += 1
    return kept, rank


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: strip the launcher's --local_rank, export LOCAL_RANK, run the app."""
    args, rank = strip_local_rank(sys.argv[1:] if argv is None else argv)
    if rank is not None:
        os.environ.setdefault("LOCAL_RANK", rank)
    app(args=args, prog_name="cl-scale")
