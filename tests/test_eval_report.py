"""Tables and run-directory files of the accuracy matrix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from cl_scale.errors import CLScaleError
from cl_scale.evaluation.metrics import Metrics
from cl_scale.evaluation.report import compare_table, matrix_table, read_matrix, write_matrix_files

TASKS = ["dbpedia", "amazon", "yahoo"]
R = [
    [80.0, None, None],
    [70.0, 60.0, None],
    [50.0, 55.0, 90.0],
]
METRICS = Metrics(ap=65.0, ft=17.5, bwt=-17.5, diag=230 / 3)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILES = {"matrix.json", "matrix.csv", "metrics.json", "heatmap.png", "ap_curve.png"}


def render(table: Table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_matrix_table_labels_rows_by_stage_and_task() -> None:
    text = render(matrix_table(R, TASKS, METRICS))
    assert "after 1: dbpedia" in text and "after 3: yahoo" in text


def test_matrix_table_marks_missing_cells() -> None:
    row = next(line for line in render(matrix_table(R, TASKS, METRICS)).splitlines() if "after 1:" in line)
    assert row.count("·") == 2 and "80.00" in row


def test_matrix_table_caption_has_all_metrics() -> None:
    text = render(matrix_table(R, TASKS, METRICS))
    assert "AP 65.00 · FT 17.50 · BWT -17.50 · diag 76.67" in text


def test_matrix_table_rejects_wrong_number_of_names() -> None:
    with pytest.raises(CLScaleError, match="task names"):
        matrix_table(R, TASKS[:2], METRICS)


def test_write_matrix_files_writes_exactly_the_five_files(tmp_path: Path) -> None:
    write_matrix_files(tmp_path, R, TASKS, METRICS)
    assert {p.name for p in tmp_path.iterdir()} == FILES  # no temporary file left behind


def test_matrix_csv_parses_back(tmp_path: Path) -> None:
    write_matrix_files(tmp_path, R, TASKS, METRICS)
    with open(tmp_path / "matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["after", *TASKS]
    assert [row[0] for row in rows[1:]] == TASKS
    parsed = [[float(v) if v else None for v in row[1:]] for row in rows[1:]]
    assert parsed == R


def test_pngs_are_valid_png_files(tmp_path: Path) -> None:
    write_matrix_files(tmp_path, R, TASKS, METRICS)
    for name in ("heatmap.png", "ap_curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_metrics_json_holds_the_metrics(tmp_path: Path) -> None:
    write_matrix_files(tmp_path, R, TASKS, METRICS)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "AP": 65.0, "FT": 17.5, "BWT": -17.5, "diag": 230 / 3,
    }


def test_read_matrix_round_trips(tmp_path: Path) -> None:
    write_matrix_files(tmp_path, R, TASKS, METRICS)
    loaded = read_matrix(tmp_path)
    assert (loaded.tasks, loaded.matrix, loaded.metrics) == (TASKS, R, METRICS)


def test_read_matrix_on_corrupt_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "matrix.json").write_bytes(b'{"tasks": ["a"], "matr')
    with pytest.raises(CLScaleError, match="not valid JSON"):
        read_matrix(tmp_path)


def test_read_matrix_on_foreign_json_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "matrix.json").write_text(json.dumps({"accuracy": [[1.0]]}))
    with pytest.raises(CLScaleError, match="not a cl-scale matrix file"):
        read_matrix(tmp_path)


def test_read_matrix_on_mismatched_tasks_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "matrix.json").write_text(
        json.dumps({"tasks": ["a", "b"], "matrix": [[1.0]], "metrics": METRICS.as_dict()})
    )
    with pytest.raises(CLScaleError, match="task names"):
        read_matrix(tmp_path)


def test_read_matrix_without_file_says_to_evaluate(tmp_path: Path) -> None:
    with pytest.raises(CLScaleError) as err:
        read_matrix(tmp_path)
    assert "cl-scale eval" in err.value.fix


def compare_rows() -> dict[str, str]:
    runs = [
        {"method": "InfLoRA", "order": "order1", "metrics": {"AP": 39.78, "FT": 7.64}},
        {"method": "InfLoRA", "order": "order2", "metrics": {"AP": 39.57, "FT": 8.93}},
        {"method": "GainLoRA", "order": "order1", "metrics": {"AP": 46.21, "FT": 2.4}},
    ]
    lines = render(compare_table(runs)).splitlines()
    return {method: next(line for line in lines if method in line) for method in ("InfLoRA", "GainLoRA")}


def test_compare_table_cells_show_ap_over_ft() -> None:
    rows = compare_rows()
    assert "39.78 / 7.64" in rows["InfLoRA"] and "39.57 / 8.93" in rows["InfLoRA"]


def test_compare_table_marks_missing_method_order_pair() -> None:
    row = compare_rows()["GainLoRA"]
    assert "46.21 / 2.40" in row and row.count("·") == 1


def test_compare_table_rejects_duplicate_run() -> None:
    run = {"method": "O-LoRA", "order": "order1", "metrics": {"AP": 1.0, "FT": 2.0}}
    with pytest.raises(CLScaleError, match="two runs"):
        compare_table([run, run])


def test_compare_table_rejects_run_without_metrics() -> None:
    with pytest.raises(CLScaleError, match="no numeric AP and FT"):
        compare_table([{"method": "O-LoRA", "order": "order1", "metrics": {}}])
