"""AP, FT, BWT, diagonal mean and the AP curve on small matrices worked out by hand."""

from __future__ import annotations

import pytest

from cl_scale.errors import CLScaleError
from cl_scale.evaluation.metrics import (
    Metrics,
    ap_after_each_stage,
    average_performance,
    backward_transfer,
    compute_metrics,
    diagonal_mean,
    forgetting,
)

# Final row 35, 65, 20, 80; diagonal 40, 50, 30, 80; best before the last stage 60, 70, 30.
R4 = [
    [40.0, None, None, None],
    [60.0, 50.0, None, None],
    [45.0, 70.0, 30.0, None],
    [35.0, 65.0, 20.0, 80.0],
]
R3 = [
    [80.0, None, None],
    [70.0, 60.0, None],
    [50.0, 55.0, 90.0],
]


def test_single_task_has_no_forgetting_or_transfer() -> None:
    metrics = compute_metrics([[70.0]])
    assert metrics == Metrics(ap=70.0, ft=0.0, bwt=0.0, diag=70.0)


def test_3x3_metrics_by_hand() -> None:
    metrics = compute_metrics(R3)
    assert metrics.ap == pytest.approx((50 + 55 + 90) / 3)
    assert metrics.ft == pytest.approx(((80 - 50) + (60 - 55)) / 2)
    assert metrics.bwt == pytest.approx(((50 - 80) + (55 - 60)) / 2)
    assert metrics.diag == pytest.approx((80 + 60 + 90) / 3)


def test_4x4_average_performance() -> None:
    assert average_performance(R4) == pytest.approx((35 + 65 + 20 + 80) / 4)


def test_4x4_forgetting_uses_best_earlier_stage_not_diagonal() -> None:
    assert forgetting(R4) == pytest.approx(((60 - 35) + (70 - 65) + (30 - 20)) / 3)


def test_4x4_backward_transfer_divides_by_t_minus_1() -> None:
    assert backward_transfer(R4) == pytest.approx(((35 - 40) + (65 - 50) + (20 - 30)) / 3)


def test_4x4_diagonal_mean() -> None:
    assert diagonal_mean(R4) == pytest.approx((40 + 50 + 30 + 80) / 4)


def test_forgetting_with_tied_maximum() -> None:
    R = [[50.0, None, None], [50.0, 40.0, None], [30.0, 40.0, 60.0]]
    assert forgetting(R) == pytest.approx(((50 - 30) + (40 - 40)) / 2)


def test_forgetting_excludes_last_stage_from_the_maximum() -> None:
    # Task 1 improves from 30 to 50 at the last stage: forgetting is negative, not clamped at 0.
    assert forgetting([[30.0, None], [50.0, 70.0]]) == pytest.approx(30 - 50)


def test_cells_above_diagonal_are_ignored() -> None:
    filled = [[v if v is not None else 999.0 for v in row] for row in R4]
    assert compute_metrics(filled) == compute_metrics(R4)


def test_ap_after_each_stage_averages_tasks_seen_so_far() -> None:
    expected = [40, (60 + 50) / 2, (45 + 70 + 30) / 3, (35 + 65 + 20 + 80) / 4]
    assert ap_after_each_stage(R4) == pytest.approx(expected)


def test_missing_cell_error_names_cell_and_eval_command() -> None:
    R = [row[:] for row in R3]
    R[2][1] = None
    with pytest.raises(CLScaleError) as err:
        compute_metrics(R)
    assert "task 2 after stage 3" in err.value.problem
    assert "R[2][1]" in err.value.problem
    assert "cl-scale eval RUN_DIR" in err.value.fix


def test_forgetting_needs_intermediate_cells_that_ap_does_not() -> None:
    R = [row[:] for row in R3]
    R[1][0] = None
    assert average_performance(R) == pytest.approx((50 + 55 + 90) / 3)
    with pytest.raises(CLScaleError, match=r"R\[1\]\[0\]"):
        forgetting(R)


def test_non_square_matrix_is_rejected() -> None:
    with pytest.raises(CLScaleError, match="not square"):
        compute_metrics([[1.0, None], [2.0]])


def test_empty_matrix_is_rejected() -> None:
    with pytest.raises(CLScaleError, match="empty"):
        compute_metrics([])


def test_non_numeric_cell_is_rejected() -> None:
    with pytest.raises(CLScaleError, match="score or None"):
        compute_metrics([["70"]])


def test_metrics_dict_round_trip_uses_paper_names() -> None:
    metrics = Metrics(ap=1.0, ft=2.0, bwt=-3.0, diag=4.0)
    assert metrics.as_dict() == {"AP": 1.0, "FT": 2.0, "BWT": -3.0, "diag": 4.0}
    assert Metrics.from_dict(metrics.as_dict()) == metrics


def test_metrics_from_dict_rejects_missing_key() -> None:
    with pytest.raises(CLScaleError, match="metrics must be"):
        Metrics.from_dict({"AP": 1.0, "FT": 2.0})
