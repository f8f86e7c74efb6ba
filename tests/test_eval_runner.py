"""`cl-scale eval` and `cl-scale generate` on a run made by a tiny real training run (GainLoRA, 2 tasks).

The commands run in this process through the CLI (a world of one, as a plain `cl-scale eval` is), except
the 2-rank check, which starts the real `deepspeed` launcher once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from cl_scale.cli import app
from cl_scale.evaluation.run_diagnostics import DIAGNOSTICS_JSON, run_branch_diagnostics
from cl_scale.evaluation.runner import QUICK_LOOK, method_label
from cl_scale.generate import read_prompts
from cl_scale.recipe import MethodConfig, load_recipe
from tests.trainer_helpers import REPO, launch, write_recipe

runner = CliRunner()
STAGES = ["01-reverse", "02-sort"]
REPORT_FILES = ["matrix.json", "matrix.csv", "metrics.json", "heatmap.png", "ap_curve.png", DIAGNOSTICS_JSON]


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A GainLoRA run over reverse, sort with every stage evaluated by the trainer (scores are not all zero)."""
    root = tmp_path_factory.mktemp("eval_runner")
    recipe = write_recipe(
        root / "gainlora.yaml", tiny_llama_dir, train={"epochs": 4, "lr": 2e-2},
        eval={"stages": "all", "metric": "rouge", "max_new_tokens": 8},
    )
    launch([(recipe, root / "run")], ranks=1, cache=root / "cache")
    return root / "run"


def _cli(args: list[str], run: Path, **env: str) -> Result:
    """`cl-scale ARGS` in this process, as a world of one, with the training run's data cache."""
    world = {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(),
        "CL_SCALE_CACHE": str(run.parent / "cache"), "COLUMNS": "200",
    }
    return runner.invoke(app, args, env={**world, **env})


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def _copy(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run.parent / "cache").symlink_to(trained.parent / "cache")
    return run


def _scores(run: Path, stage: str) -> dict:
    return json.loads((run / "stages" / stage / "scores.json").read_text())


def _predictions(run: Path, stage: str, task: str) -> Path:
    return run / "stages" / stage / "predictions" / f"{task}.jsonl"


def _drop_cell(run: Path, stage: str, task: str) -> None:
    scores = _scores(run, stage)
    del scores[task]
    (run / "stages" / stage / "scores.json").write_text(json.dumps(scores))
    _predictions(run, stage, task).unlink()


@pytest.fixture(scope="module")
def filled(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """A copy of the run with R[2][reverse] and the report files removed, then `cl-scale eval`."""
    run = _copy(trained, tmp_path_factory.mktemp("filled"))
    _drop_cell(run, STAGES[1], "reverse")
    for name in REPORT_FILES:
        (run / name).unlink(missing_ok=True)
    return run, _cli(["eval", str(run)], run)


def test_eval_refills_a_removed_cell_with_the_trainers_score(filled, trained) -> None:
    run, result = filled
    _ok(result)
    assert _scores(run, STAGES[1])["reverse"] == _scores(trained, STAGES[1])["reverse"]


def test_eval_regenerates_the_removed_predictions_identically(filled, trained) -> None:
    run, result = filled
    _ok(result)
    regenerated = _predictions(run, STAGES[1], "reverse").read_text()
    assert regenerated == _predictions(trained, STAGES[1], "reverse").read_text()


def test_eval_rebuilds_the_trainers_matrix(filled, trained) -> None:
    run, result = filled
    _ok(result)
    assert json.loads((run / "matrix.json").read_text()) == json.loads((trained / "matrix.json").read_text())


def test_eval_writes_every_report_file(filled) -> None:
    run, result = filled
    _ok(result)
    assert [name for name in REPORT_FILES if not (run / name).is_file()] == []


def test_eval_prints_the_matrix_and_its_metrics(filled) -> None:
    _, result = filled
    for text in ("Accuracy matrix", "AP ", "FT ", "BWT ", "diag "):
        assert text in _ok(result).stdout


def test_eval_prints_the_collision_tolerance(filled) -> None:
    run, result = filled
    tolerance = json.loads((run / DIAGNOSTICS_JSON).read_text())["branches"]["collision_tolerance"]
    assert f"|v| > {tolerance:g}" in _ok(result).stdout


def test_eval_stores_one_gate_coefficient_per_task_pair(filled) -> None:
    run, result = filled
    _ok(result)
    gates = json.loads((run / DIAGNOSTICS_JSON).read_text())["gates"]
    assert len(gates) == 2 and all(len(row) == 2 and all(0.0 <= v <= 1.0 for v in row) for row in gates)


def test_quick_look_leaves_the_stage_folders_alone(trained, tmp_path) -> None:
    run = _copy(trained, tmp_path)
    _drop_cell(run, STAGES[1], "reverse")
    _ok(_cli(["eval", str(run), "--max-examples", "3"], run))
    assert "reverse" not in _scores(run, STAGES[1]) and not _predictions(run, STAGES[1], "reverse").exists()


def test_quick_look_writes_its_partial_predictions_aside(trained, tmp_path) -> None:
    run = _copy(trained, tmp_path)
    _drop_cell(run, STAGES[1], "reverse")
    _ok(_cli(["eval", str(run), "--max-examples", "3"], run))
    quick = _predictions(run / QUICK_LOOK, STAGES[1], "reverse")
    assert len(quick.read_text().splitlines()) == 3


def test_eval_of_a_missing_directory_fails_with_one_message(tmp_path) -> None:
    result = runner.invoke(app, ["eval", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.output


def test_eval_of_a_foreign_directory_fails_with_one_message(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a run")
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a cl-scale run directory" in result.stderr and "Traceback" not in result.output


def test_predictions_of_the_wrong_length_are_reported(trained, tmp_path) -> None:
    run = _copy(trained, tmp_path)
    path = _predictions(run, STAGES[1], "sort")
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    result = _cli(["eval", str(run)], run)
    assert result.exit_code == 2
    assert "holds 3 predictions but task sort has 8 test examples" in result.stderr


def test_a_snapshot_that_does_not_match_the_recipe_is_reported(trained, tmp_path) -> None:
    run = _copy(trained, tmp_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["method"]["rank"] = 8
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = _cli(["eval", str(run)], run)
    assert result.exit_code == 2
    assert "does not match" in result.stderr and "Traceback" not in result.output


def test_generate_gives_answers_and_every_gate_for_each_input(trained, tmp_path) -> None:
    run = _copy(trained, tmp_path)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        '{"prompt": "Reverse the list.\\nb f a\\nOutput: "}\n{"definition": "Sort the list.", "input": "c a"}\n'
    )
    result = _ok(_cli(["generate", str(run), "--input", str(inputs)], run))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(type(r["answer"]), sorted(r["gates"])) for r in rows] == [(str, ["reverse", "sort"])] * 2


def test_generate_prints_a_table_on_a_terminal(trained, tmp_path) -> None:
    run = _copy(trained, tmp_path)
    args = ["generate", str(run), "--prompt", "Sort the list.\nc a\nOutput: "]
    result = _ok(_cli(args, run, FORCE_COLOR="1", NO_COLOR="1"))
    assert "gate reverse" in result.stdout and "gate sort" in result.stdout


def test_generate_refuses_a_stage_the_run_has_not_finished(trained) -> None:
    result = _cli(["generate", str(trained), "--stage", "3", "--prompt", "x"], trained)
    assert result.exit_code == 2
    assert "has 2 finished stage(s)" in result.stderr


def test_compare_puts_methods_in_rows_and_orders_in_columns(filled, tmp_path) -> None:
    run, _ = filled
    other = tmp_path / "other"
    shutil.copytree(run, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "order": "order2"}))
    result = _ok(_cli(["eval", str(run), "--compare", str(other)], run))
    table = result.stdout[result.stdout.index("AP / FT"):]
    header = next(line for line in table.splitlines() if "order2" in line)
    row = next(line for line in table.splitlines() if "GainLoRA (InfLoRA)" in line)
    assert "reverse → sort" in header and row.count("/") == 2


def test_method_label_names_gainloras_branch_method() -> None:
    assert method_label(MethodConfig(name="gainlora", branch="olora")) == "GainLoRA (O-LoRA)"


def test_a_single_branch_has_no_branch_diagnostics(tmp_path) -> None:
    path = tmp_path / "snapshot.safetensors"
    save_file({"layer.lora_A_0": torch.ones(4, 8), "layer.lora_B_0": torch.ones(8, 4)}, str(path))
    assert run_branch_diagnostics(path, MethodConfig(name="seqlora", rank=4)) is None


def test_generate_builds_definition_and_input_with_the_runs_template(tmp_path, tiny_llama_dir) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_llama_dir))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"definition": "Sort the list.", "input": "c a"}\n')
    assert read_prompts(inputs, None, recipe, recipe.data.tasks) == ["Sort the list.\nc a\nOutput: "]


@pytest.mark.multirank
def test_two_ranks_fill_the_same_matrix_as_one(trained, tmp_path) -> None:
    run = _copy(trained, tmp_path)
    (run / "stages" / STAGES[0] / "scores.json").unlink()
    _drop_cell(run, STAGES[1], "sort")
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", _free_port(),
        str(bin_dir / "cl-scale"), "eval", str(run),
    ]
    env = {**os.environ, "CL_SCALE_CACHE": str(trained.parent / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((run / "matrix.json").read_text()) == json.loads((trained / "matrix.json").read_text())
