"""The `cl-scale` command line: recipe show, error reporting, launcher arguments, help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_recipe import MINIMAL
from typer.testing import CliRunner

import cl_scale.recipe
from cl_scale.cli import app, main, strip_local_rank
from cl_scale.errors import CLScaleError

runner = CliRunner()



@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(MINIMAL)
    return path


def shown(*args: str) -> dict:
    result = runner.invoke(app, ["recipe", "show", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_recipe_show_prints_the_resolved_recipe(recipe: Path) -> None:
    data = shown(str(recipe))
    assert data["name"] == "run"
    assert data["method"]["gate"]["hidden"] == 100


def test_recipe_show_applies_bare_overrides(recipe: Path) -> None:
    method = shown(str(recipe), "method.rank=4", "method.name=seqlora")["method"]
    assert (method["rank"], method["name"]) == (4, "seqlora")


def test_recipe_show_applies_set_overrides(recipe: Path) -> None:
    train = shown(str(recipe), "--set", "train.epochs=5", "-s", "train.seed=7")["train"]
    assert (train["epochs"], train["seed"]) == (5, 7)


def test_set_overrides_apply_after_bare_ones(recipe: Path) -> None:
    assert shown(str(recipe), "--set", "method.rank=16", "method.rank=4")["method"]["rank"] == 16


def test_unknown_key_exits_2_with_key_line_and_suggestion(recipe: Path) -> None:
    recipe.write_text(MINIMAL + "train:\n  lrr: 0.1\n")
    result = runner.invoke(app, ["recipe", "show", str(recipe)])
    assert result.exit_code == 2
    assert "line 7: unknown key `train.lrr`" in result.stderr
    assert "did you mean `train.lr`?" in result.stderr
    assert "Traceback" not in result.output


def test_recipe_show_refuses_an_unknown_order(recipe: Path) -> None:
    result = runner.invoke(app, ["recipe", "show", str(recipe), "--set", "data.order=no_such_order"])
    assert result.exit_code == 2
    assert "`data.order`: expected a named order" in result.stderr


def test_malformed_override_exits_2_with_the_expected_form(recipe: Path) -> None:
    result = runner.invoke(app, ["recipe", "show", str(recipe), "train.lr"])
    assert result.exit_code == 2
    assert "dotted.key=value" in result.stderr


def test_debug_re_raises_the_error(recipe: Path) -> None:
    result = runner.invoke(app, ["--debug", "recipe", "show", str(recipe), "train.lrr=1"])
    assert isinstance(result.exception, CLScaleError)


def test_keyboard_interrupt_exits_130(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cl_scale.recipe, "load_recipe", interrupted)
    result = runner.invoke(app, ["recipe", "show", str(recipe)])
    assert result.exit_code == 130
    assert "interrupted" in result.stderr


def test_generate_needs_exactly_one_of_input_or_prompt(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", str(tmp_path)])
    assert result.exit_code == 2
    assert "exactly one of --input" in result.stderr


@pytest.mark.parametrize(
    ("args", "rank"),
    [
        (["--local_rank=1", "train", "r.yaml"], "1"),
        (["train", "r.yaml", "--local_rank", "3"], "3"),
        (["train", "r.yaml"], None),
    ],
)
def test_strip_local_rank_removes_the_launcher_argument(args: list[str], rank: str | None) -> None:
    assert strip_local_rank(args) == (["train", "r.yaml"], rank)


def test_main_strips_local_rank_and_exports_it(
    recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["--local_rank=1", "recipe", "show", str(recipe)])
    assert exited.value.code == 0
    assert os.environ["LOCAL_RANK"] == "1"
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "run"


def test_main_keeps_an_existing_local_rank(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit):
        main(["--local_rank=5", "recipe", "show", str(recipe)])
    assert os.environ["LOCAL_RANK"] == "0"


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "generate", "plan", "recipe", "data"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "command",
    [["train"], ["eval"], ["generate"], ["plan"], ["recipe", "show"], ["data", "list"], ["data", "check"]],
    ids=" ".join,
)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout


def test_importing_the_cli_loads_neither_torch_nor_deepspeed() -> None:
    code = "import sys, cl_scale.cli; print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
