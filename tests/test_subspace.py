"""Subspace math: second moments without padding, collectors, the GPM extension rule, projectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_scale.errors import CLScaleError
from cl_scale.modeling.branched_linear import BranchedLinear
from cl_scale.modeling.context import BranchContext
from cl_scale.modeling.gates import GateBank
from cl_scale.subspace import (
    Basis,
    SecondMoment,
    collect_gate_moments,
    collect_layer_inputs,
    extend_basis,
    layer_statistics,
    threshold_at,
    top_directions,
)


def _diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64))


def _eye_columns(d: int, *indices: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64)[:, list(indices)]


def _count(
    u: torch.Tensor, c: torch.Tensor, threshold: float, energy: str, task_index: int = 0, num_tasks: int = 1
) -> int:
    extended = extend_basis(u, c, threshold=threshold, task_index=task_index, num_tasks=num_tasks, energy=energy)
    return extended.shape[1] - u.shape[1]


def _random_psd(d: int, rank: int, seed: int) -> torch.Tensor:
    z = torch.randn(rank, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z.T @ z / rank


# --- threshold schedule and the GPM rule on hand-made spectra -------------------------------------


def test_threshold_grows_from_eps_towards_one_with_the_zero_based_task_index() -> None:
    assert threshold_at(0.9, 0, 10) == pytest.approx(0.9)
    assert threshold_at(0.9, 5, 10) == pytest.approx(0.95)


def test_first_task_squared_energy_keeps_directions_while_the_kept_fraction_stays_below_eps() -> None:
    # squared energies 16, 9, 4, 1 of 30: kept fraction with each direction is .533, .833, .967, 1
    assert _count(_eye_columns(4), _diag(4, 3, 2, 1), 0.8, "squared") == 1
    assert _count(_eye_columns(4), _diag(4, 3, 2, 1), 0.9, "squared") == 2


def test_first_task_classic_energy_uses_the_eigenvalues_themselves() -> None:
    # energies 4, 3, 2, 1 of 10: kept fraction with each direction is .4, .7, .9, 1
    assert _count(_eye_columns(4), _diag(4, 3, 2, 1), 0.8, "classic") == 2


def test_first_task_keeps_at_least_one_direction() -> None:
    assert _count(_eye_columns(3), _diag(100, 1, 1), 0.01, "squared") == 1


def test_first_task_directions_are_the_leading_eigenvectors() -> None:
    u = extend_basis(_eye_columns(4), _diag(1, 4, 2, 3), threshold=0.9, task_index=0, num_tasks=1, energy="squared")
    torch.testing.assert_close(u, _eye_columns(4, 1, 3))


def test_first_task_at_threshold_one_leaves_out_the_weakest_direction_like_the_reference() -> None:
    assert _count(_eye_columns(5), _diag(3, 2, 1, 0, 0), 1.0, "squared") == 2


@pytest.mark.parametrize("energy", ["squared", "classic"])
@pytest.mark.parametrize("d", [12, 32])
def test_first_task_at_threshold_one_leaves_out_the_weakest_direction_of_random_data(d: int, energy: str) -> None:
    # the kept fraction must reach exactly 1 at the last direction whatever the float rounding of the sums
    first = torch.zeros(d, 0, dtype=torch.float64)
    for seed in range(20):
        c = _random_psd(d, 2 * d, seed)
        assert _count(first, c, 1.0, energy) == d - 1, f"seed {seed}"


def test_later_task_at_threshold_one_spans_exactly_the_data() -> None:
    assert _count(_eye_columns(5, 0), _diag(3, 2, 1, 0, 0), 1.0, "squared", task_index=1, num_tasks=2) == 2


def test_later_task_classic_starts_from_the_energy_already_inside_the_basis() -> None:
    # E = 10, outside e1: 3, 2, 1, so acc starts at 0.4; eps_1 = 0.6 + 0.4 * 1/2 = 0.8 -> appends e2, e3
    u = extend_basis(_eye_columns(4, 0), _diag(4, 3, 2, 1), threshold=0.6, task_index=1, num_tasks=2, energy="classic")
    torch.testing.assert_close(u, _eye_columns(4, 0, 1, 2))


def test_later_task_squared_starts_from_the_energy_already_inside_the_basis() -> None:
    # E = 30, outside e1: 9, 4, 1, so acc starts at 16/30 = .533, then .833 >= 0.8 -> appends e2 only
    u = extend_basis(_eye_columns(4, 0), _diag(4, 3, 2, 1), threshold=0.6, task_index=1, num_tasks=2, energy="squared")
    torch.testing.assert_close(u, _eye_columns(4, 0, 1))


def test_later_task_adds_nothing_when_the_basis_already_holds_enough_energy() -> None:
    assert _count(_eye_columns(4, 0), _diag(9, 1, 0.1, 0.1), 0.9, "squared", task_index=1, num_tasks=2) == 0


def test_extension_never_exceeds_the_dimension() -> None:
    c = _random_psd(6, rank=12, seed=0)
    assert extend_basis(_eye_columns(6, 0, 1, 2, 3, 4), c, threshold=1.0, task_index=1, num_tasks=2).shape == (6, 6)
    assert extend_basis(torch.eye(6, dtype=torch.float64), c, threshold=1.0, task_index=1, num_tasks=2).shape == (6, 6)


def test_extended_basis_stays_orthonormal_for_a_general_statistic() -> None:
    old = extend_basis(_eye_columns(12), _random_psd(12, rank=3, seed=1), threshold=1.0, task_index=0, num_tasks=2)
    new = extend_basis(old, _random_psd(12, rank=4, seed=2), threshold=1.0, task_index=1, num_tasks=2)
    assert new.shape == (12, old.shape[1] + 4)
    torch.testing.assert_close(new.T @ new, torch.eye(new.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)


def test_unknown_energy_is_a_user_error() -> None:
    with pytest.raises(CLScaleError, match="energy"):
        extend_basis(_eye_columns(2), _diag(1, 1), threshold=0.9, task_index=0, num_tasks=1, energy="cubic")


def test_top_directions_are_the_leading_left_singular_vectors() -> None:
    m = torch.randn(9, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    u, _, _ = torch.linalg.svd(m)
    directions = top_directions(m, 4)
    torch.testing.assert_close((directions.T @ u[:, :4]).abs(), torch.eye(4, dtype=torch.float64))


def test_asking_for_more_directions_than_a_matrix_has_fails() -> None:
    with pytest.raises(ValueError, match="only 3"):
        top_directions(torch.ones(5, 3, dtype=torch.float64), 4)


def test_top_directions_have_deterministic_signs() -> None:
    m = torch.randn(8, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    u = top_directions(m, 3)
    torch.testing.assert_close(top_directions(m @ rotation, 3), u)
    torch.testing.assert_close(top_directions(-m, 3), u)
    assert bool((u[u.abs().argmax(dim=0), torch.arange(3)] > 0).all())


# --- Basis ------------------------------------------------------------------------------------------


def test_projections_remove_the_basis_from_columns_and_from_rows() -> None:
    basis = Basis(_eye_columns(3, 0).float())
    m = torch.arange(9.0).reshape(3, 3)
    torch.testing.assert_close(basis.project_out(m), torch.tensor([[0.0, 0, 0], [3, 4, 5], [6, 7, 8]]))
    torch.testing.assert_close(basis.project_out_rows(m), torch.tensor([[0.0, 1, 2], [0, 4, 5], [0, 7, 8]]))
    torch.testing.assert_close(basis.projector(), torch.diag(torch.tensor([1.0, 0, 0])))


def test_leading_directions_outside_the_basis_are_orthogonal_to_it() -> None:
    basis = Basis(extend_basis(_eye_columns(10), _random_psd(10, 4, seed=5), threshold=1.0, task_index=0, num_tasks=1))
    directions = basis.leading_outside(_random_psd(10, 2, seed=6), 3)  # rank 2 < 3: the third is a free choice
    assert directions.shape == (10, 3)
    assert (basis.vectors.double().T @ directions).abs().max() < 1e-10
    torch.testing.assert_close(directions.T @ directions, torch.eye(3, dtype=torch.float64))


def test_leading_directions_fail_clearly_when_the_basis_leaves_no_room() -> None:
    with pytest.raises(CLScaleError, match="lower method.threshold or method.rank"):
        Basis(_eye_columns(4, 0, 1, 2).float()).leading_outside(_diag(1, 1, 1, 1), 2)


# --- second moments and collectors ------------------------------------------------------------------


def test_second_moment_is_the_mean_outer_product() -> None:
    z = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(7))
    moment = SecondMoment(3)
    moment.add(z)
    rows = z.reshape(-1, 3).double()
    torch.testing.assert_close(moment.value(), rows.T @ rows / 10)


def test_second_moment_excludes_padding() -> None:
    generator = torch.Generator().manual_seed(8)
    z = torch.randn(2, 4, 3, generator=generator)
    plain = SecondMoment(3)
    plain.add(z)
    padded_z = torch.cat([z, 100 * torch.randn(2, 3, 3, generator=generator)], dim=1)
    mask = torch.cat([torch.ones(2, 4), torch.zeros(2, 3)], dim=1).long()
    padded = SecondMoment(3)
    padded.add(padded_z, mask)
    torch.testing.assert_close(padded.value(), plain.value())


def test_second_moment_of_nothing_is_a_user_error() -> None:
    with pytest.raises(CLScaleError, match="no real tokens"):
        SecondMoment(2).value()


def _layer(d_in: int, context: BranchContext, stream: str = "source") -> BranchedLinear:
    return BranchedLinear(nn.Linear(d_in, 2), rank=1, alpha=1.0, dropout=0.0, context=context, stream=stream)


def test_layer_collector_masks_inputs_with_the_stream_of_the_layer() -> None:
    context = BranchContext()
    layer = _layer(3, context, stream="target")
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(9))
    context.masks = {"source": torch.ones(2, 4), "target": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])}
    with collect_layer_inputs({"layer": layer}, context) as moments:
        layer(x)
    rows = torch.stack([x[0, 0], x[0, 1], x[1, 0]]).double()
    torch.testing.assert_close(moments["layer"].value(), rows.T @ rows / 3)


def test_layer_collector_stops_collecting_after_the_block() -> None:
    context = BranchContext(masks={"source": torch.ones(1, 2)})
    layer = _layer(3, context)
    with collect_layer_inputs({"layer": layer}, context) as moments:
        layer(torch.ones(1, 2, 3))
    layer(torch.ones(1, 2, 3))
    assert moments["layer"].count.item() == 2


def test_grouped_statistics_equal_one_pass_and_bound_the_layers_per_pass() -> None:
    context = BranchContext(masks={"source": torch.ones(3, 5)})
    layers = {f"l{i}": _layer(4, context) for i in range(3)}
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(10))
    passes = []

    def data_pass() -> None:
        passes.append(sum(len(layer._forward_pre_hooks) for layer in layers.values()))
        for i, layer in enumerate(layers.values()):
            layer(x * (i + 1))

    grouped = dict(layer_statistics(layers, context, data_pass, per_pass=2))
    assert passes == [2, 1]
    together = dict(layer_statistics(layers, context, data_pass, per_pass=None))
    assert passes[2:] == [3]
    for name in layers:
        torch.testing.assert_close(grouped[name], together[name])


def test_gate_collector_sees_the_newest_gate_and_restores_the_observer() -> None:
    bank = GateBank(d_model=4, hidden=3)
    generator = torch.Generator().manual_seed(11)
    bank.add_gate(generator)
    bank.add_gate(generator)
    xbar = torch.randn(5, 4, generator=generator)
    with collect_gate_moments(bank) as moments:
        bank(xbar)
    assert bank.observer is None
    w1, w2, _ = bank.gate(1)
    hidden = torch.nn.functional.silu(xbar @ w1.T).detach().double()
    output = torch.nn.functional.silu(hidden.float() @ w2.T).detach().double()
    torch.testing.assert_close(moments.input.value(), xbar.double().T @ xbar.double() / 5)
    torch.testing.assert_close(moments.hidden.value(), hidden.T @ hidden / 5)
    torch.testing.assert_close(moments.output.value(), output.T @ output / 5)
