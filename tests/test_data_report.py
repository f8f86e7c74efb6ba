import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from cl_scale.data_check import check_recipe_cli, list_tasks_cli
from cl_scale.data.tasks import SYNTHETIC_ROOT

RED = "\x1b[31m"


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    task = tmp_path / "Long_Sequence" / "cb"
    task.mkdir(parents=True)
    instances = [{"input": "word " * 30, "output": "entailment"} for _ in range(3)]
    (task / "train.json").write_text(json.dumps({"Definition": ["Decide."], "Instances": instances}))
    return tmp_path


@pytest.fixture
def wide_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("FORCE_COLOR", "1")


def fake_recipe(root: str, model_path: str, tasks: list[str]) -> SimpleNamespace:
    data = SimpleNamespace(
        root=root, order=None, tasks=tasks, template="auto", max_source_length=16, max_target_length=8,
        max_train_examples=None, max_eval_examples=None,
    )
    return SimpleNamespace(data=data, model=SimpleNamespace(path=model_path), train=SimpleNamespace(seed=0))


def test_list_shows_split_sizes(bench: Path, wide_colour: None, capsys: pytest.CaptureFixture[str]) -> None:
    list_tasks_cli(str(bench))
    line = next(line for line in capsys.readouterr().out.splitlines() if " cb " in line)
    assert "3" in line and "exact" in line


def test_list_marks_missing_splits_in_red(bench: Path, wide_colour: None, capsys: pytest.CaptureFixture[str]) -> None:
    list_tasks_cli(str(bench))
    assert capsys.readouterr().out.count(f"{RED}missing") == 2


def test_list_of_the_builtin_suite_shows_its_tasks(wide_colour: None, capsys: pytest.CaptureFixture[str]) -> None:
    list_tasks_cli(SYNTHETIC_ROOT)
    out = capsys.readouterr().out
    assert " reverse " in out and " count " in out


@pytest.fixture
def cb_check(bench: Path, llama_tokenizer_dir: Path, wide_colour: None, capsys: pytest.CaptureFixture[str]) -> str:
    """What the data check prints for the cb task with the Llama tokenizer (prompts of at most 16 tokens)."""
    check_recipe_cli(fake_recipe(str(bench), str(llama_tokenizer_dir), ["cb"]))
    return capsys.readouterr().out


def test_check_reports_token_lengths_and_truncation(cb_check: str) -> None:
    assert "Lengths in tokens" in cb_check
    train_row = next(line for line in cb_check.splitlines() if " train " in line and "cb" in line)
    assert f"{RED}3" in train_row  # all three 30-word prompts exceed 16 tokens


def test_check_reports_missing_splits(cb_check: str) -> None:
    test_row = next(line for line in cb_check.splitlines() if " test " in line)
    assert f"{RED}missing" in test_row


def test_check_falls_back_to_word_counts_without_a_tokenizer(
    bench: Path, wide_colour: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = fake_recipe(str(bench), "builtin:nothing", ["cb"])
    loading = types.ModuleType("cl_scale.modeling.loading")

    def broken(model_cfg: object) -> None:
        raise OSError("no such model")

    loading.load_tokenizer = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cl_scale.modeling.loading", loading)
    check_recipe_cli(recipe)
    out = capsys.readouterr().out
    assert "no such model" in out and "Lengths in words" in out
