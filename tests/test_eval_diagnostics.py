"""N-LoRA diagnostics and the gate matrix on hand-made tensors."""

from __future__ import annotations

import itertools

import pytest
import torch
from rich.console import Console

from cl_scale.errors import CLScaleError
from cl_scale.evaluation import diagnostics
from cl_scale.evaluation.diagnostics import (
    branch_diagnostics,
    gate_matrix,
    parameter_collision_rate,
    task_orthogonality,
)
from cl_scale.evaluation.report import diagnostics_table, gate_table


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Rank-1 branches on a 2x2 layer; Delta W = B A is the outer product of B's column and A's row.
TOP_LEFT = (t([[1, 0]]), t([[1], [0]]))  # support {(0, 0)}
BOTTOM_RIGHT = (t([[0, 1]]), t([[0], [1]]))  # support {(1, 1)}
TOP_ROW = (t([[1, 1]]), t([[1], [0]]))  # support {(0, 0), (0, 1)}
RIGHT_COLUMN = (t([[0, 1]]), t([[1], [1]]))  # support {(0, 1), (1, 1)}
DENSE = (t([[1, 1]]), t([[1], [1]]))  # every entry
OTHER_DENSE = (t([[2, 3]]), t([[1], [-1]]))  # every entry


def test_disjoint_supports_do_not_collide() -> None:
    assert parameter_collision_rate({"q": [TOP_LEFT, BOTTOM_RIGHT]}, scaling=1.0) == 0.0


def test_identical_full_supports_collide_everywhere() -> None:
    assert parameter_collision_rate({"q": [DENSE, OTHER_DENSE]}, scaling=1.0) == pytest.approx(1.0)


def test_collision_rate_averages_over_pairs() -> None:
    # Pairs (0,1): overlap (0,0) -> 1/4; (0,2): none -> 0; (1,2): overlap (0,1) -> 1/4.
    rate = parameter_collision_rate({"q": [TOP_LEFT, TOP_ROW, RIGHT_COLUMN]}, scaling=1.0)
    assert rate == pytest.approx((1 / 4 + 0 + 1 / 4) / 3)


def test_collision_rate_weights_modules_equally_whatever_their_size() -> None:
    wide = (t([[1, 1, 1]]), t([[1]]))  # a 1x3 layer, dense
    branches = {"q": [TOP_LEFT, BOTTOM_RIGHT], "v": [wide, wide]}
    assert parameter_collision_rate(branches, scaling=1.0) == pytest.approx((0.0 + 1.0) / 2)


def test_entries_below_tolerance_count_as_zero() -> None:
    tiny = (t([[1e-8, 1e-8]]), t([[1], [1]]))
    assert parameter_collision_rate({"q": [DENSE, tiny]}, scaling=1.0) == 0.0
    assert parameter_collision_rate({"q": [DENSE, tiny]}, scaling=1.0, tol=1e-9) == pytest.approx(1.0)


def test_scaling_multiplies_the_update_before_the_tolerance() -> None:
    assert parameter_collision_rate({"q": [DENSE, OTHER_DENSE]}, scaling=1e-7) == 0.0


def test_single_task_has_no_collision() -> None:
    assert parameter_collision_rate({"q": [DENSE]}, scaling=1.0) == 0.0


def test_row_blocks_give_the_same_rate_as_the_whole_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(3):
        A = torch.randn(2, 7, generator=generator) * (torch.rand(2, 7, generator=generator) < 0.3)
        B = torch.randn(5, 2, generator=generator) * (torch.rand(5, 2, generator=generator) < 0.5)
        pairs.append((A, B))
    supports = [(0.5 * B @ A).abs() > 1e-6 for A, B in pairs]
    expected = sum((si & sj).sum().item() / 35 for si, sj in itertools.combinations(supports, 2)) / 3
    monkeypatch.setattr(diagnostics, "_BLOCK_ELEMENTS", 3 * 7)  # one row of Delta W at a time
    assert parameter_collision_rate({"q": pairs}, scaling=0.5) == pytest.approx(expected)


def test_modules_with_different_task_counts_are_rejected() -> None:
    with pytest.raises(CLScaleError, match="numbers of task branches"):
        parameter_collision_rate({"q": [DENSE, DENSE], "v": [DENSE]}, scaling=1.0)


def test_branches_that_do_not_multiply_are_rejected() -> None:
    with pytest.raises(CLScaleError, match="do not form B @ A"):
        task_orthogonality({"q": [(t([[1, 0]]), t([[1, 0]]))]})


def test_orthogonal_a_rows_give_zero() -> None:
    branches = {"q": [(t([[1, 0, 0]]), t([[0]])), (t([[0, 1, 0]]), t([[0]]))]}
    assert task_orthogonality(branches) == 0.0


def test_orthogonality_sums_squared_frobenius_over_pairs() -> None:
    A0 = t([[1, 0, 0], [0, 1, 0]])
    A1 = t([[1, 1, 0], [0, 0, 2]])
    A2 = t([[3, 0, 0], [0, 0, 0]])
    B = torch.zeros(1, 2)
    # A0 A1^T = [[1, 0], [1, 0]] -> 2;  A0 A2^T = [[3, 0], [0, 0]] -> 9;  A1 A2^T = [[3, 0], [0, 0]] -> 9.
    assert task_orthogonality({"q": [(A0, B), (A1, B), (A2, B)]}) == pytest.approx(20.0)


def test_orthogonality_sums_over_modules() -> None:
    B = torch.zeros(1, 1)
    module = [(t([[1, 0]]), B), (t([[2, 0]]), B)]  # ||A0 A1^T||_F^2 = 4
    assert task_orthogonality({"q": module, "v": module}) == pytest.approx(8.0)


def test_gate_matrix_is_mean_coefficient_per_input_task_and_gate() -> None:
    coefs = {0: t([[0.9, 0.1], [0.7, 0.3]]), 1: t([[0.2, 0.8], [0.4, 0.6]])}
    assert gate_matrix(coefs) == [pytest.approx([0.8, 0.2]), pytest.approx([0.3, 0.7])]


def test_gate_matrix_rejects_gapped_task_keys() -> None:
    with pytest.raises(CLScaleError, match="expected 0..T-1"):
        gate_matrix({0: t([[1.0]]), 2: t([[1.0]])})


def test_gate_matrix_rejects_different_gate_counts() -> None:
    with pytest.raises(CLScaleError, match="same number of gates"):
        gate_matrix({0: t([[1.0, 0.0]]), 1: t([[1.0]])})


def render(table: object) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_branch_diagnostics_records_tolerance() -> None:
    diag = branch_diagnostics({"q": [TOP_LEFT, BOTTOM_RIGHT]}, scaling=1.0, tol=1e-4)
    assert diag.as_dict()["collision_tolerance"] == 1e-4


def test_diagnostics_table_prints_tolerance_and_values() -> None:
    text = render(diagnostics_table(branch_diagnostics({"q": [DENSE, OTHER_DENSE]}, scaling=1.0)))
    assert "|v| > 1e-06" in text and "100.0000%" in text


def test_gate_table_shows_one_row_per_input_task() -> None:
    text = render(gate_table([[0.8, 0.2], [0.3, 0.7]], ["sst2", "imdb"]))
    row = next(line for line in text.splitlines() if line.strip("│ ").startswith("imdb"))
    assert "0.300" in row and "0.700" in row
