"""GainLoRA: gate initialisation, the key design, the update projection and Proposition 3.1, measured."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from methods_fixtures import built, learn, start_task, task_batches, train_steps

from cl_scale.methods.gainlora import GainLoRA
from cl_scale.modeling.gates import GateBank
from cl_scale.modeling.wrapper import ContinualModel
from cl_scale.subspace import Basis

OLD_TASK = {"samples": 8, "prompt": (3, 5), "answer": 1}
"""Task 1 of the Proposition 3.1 runs: few short samples, so even a full basis leaves the gate room to learn."""


def _gate_output(gates: GateBank, index: int, xbar: torch.Tensor) -> torch.Tensor:
    w1, w2, _ = gates.gate(index)
    return F.silu(F.silu(xbar @ w1.T) @ w2.T).detach()


def _span(rows: torch.Tensor) -> Basis:
    """Orthonormal basis of exactly the span of `rows` (n, d)."""
    u, singular, _ = torch.linalg.svd(rows.double().T, full_matrices=False)
    return Basis(u[:, singular > singular[0] * 1e-10].float())


def _use_full_bases(method: GainLoRA, gates: GateBank, xbar: torch.Tensor) -> None:
    """Bases spanning ALL of task 1's gate inputs, hidden activations and outputs (a "full basis")."""
    w1, w2, _ = gates.gate(0)
    hidden = F.silu(xbar @ w1.T).detach()
    method.bases = {"input": _span(xbar), "hidden": _span(hidden), "output": _span(F.silu(hidden @ w2.T).detach())}


def _second_task_started(**overrides: object) -> tuple[ContinualModel, GainLoRA]:
    model, method = built("gainlora", **overrides)
    learn(method, model, 0)
    return model, method


def _perturb(params: list[torch.nn.Parameter], seed: int) -> list[torch.Tensor]:
    """Stands in for an optimizer step: adds a random update, returns the values before it."""
    before = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator))
    return before


def _projected_step(method: GainLoRA, model: ContinualModel, task: int) -> list[torch.Tensor]:
    """The applied updates of W1, W2, key of gate `task` after a random step and the projection."""
    runner, _ = start_task(method, model, task)
    params = list(model.gates.gate(task))
    method.before_step(runner)
    before = _perturb(params, seed=7)
    method.after_step(runner)
    return [p.detach() - b for p, b in zip(params, before, strict=True)]


# --- gate and key initialisation ------------------------------------------------------------------


def test_new_gate_mlp_starts_as_a_copy_of_the_previous_trained_gate() -> None:
    model, method = _second_task_started()
    start_task(method, model, 1)
    (w1_old, w2_old, _), (w1, w2, _) = model.gates.gate(0), model.gates.gate(1)
    assert torch.equal(w1, w1_old) and torch.equal(w2, w2_old)


def test_key_is_orthogonal_to_old_gate_outputs_and_has_norm_sqrt_d_over_3() -> None:
    model, method = _second_task_started()
    start_task(method, model, 1)
    key = model.gates.gate(1)[2].detach()
    assert (key @ method.bases["output"].vectors).abs().max() < 1e-5
    torch.testing.assert_close(key.norm(), torch.tensor(math.sqrt(model.gates.d_model / 3)))


def test_first_key_is_the_top_direction_of_the_gate_outputs() -> None:
    model, method = built("gainlora")
    runner, _ = start_task(method, model, 0)
    xbar = torch.cat([model.gate_input(b["input_ids"], b["prompt_mask"]) for b in runner.batches])
    outputs = _gate_output(model.gates, 0, xbar).double()
    top = torch.linalg.eigh(outputs.T @ outputs).eigenvectors[:, -1]
    key = model.gates.gate(0)[2].detach().double()
    assert abs(F.cosine_similarity(key, top, dim=0).item()) > 1 - 1e-6


def test_after_a_task_the_gate_bases_span_input_hidden_and_output_spaces() -> None:
    model, method = _second_task_started()
    dims = {space: basis.dim for space, basis in method.bases.items()}
    assert dims == {"input": model.gates.d_model, "hidden": model.gates.hidden, "output": model.gates.d_model}


def test_gate_statistics_ride_on_the_inflora_passes() -> None:
    model, method = built("gainlora")
    assert learn(method, model, 0).passes == 2


def test_gainlora_runs_its_own_passes_when_the_branch_method_has_none() -> None:
    model, method = built("gainlora", branch="olora")
    assert learn(method, model, 0).passes == 2


def test_composed_olora_penalties_reach_the_loss_terms() -> None:
    model, method = built("gainlora", branch="olora")
    learn(method, model, 0)
    runner, optimizer = start_task(method, model, 1)
    terms = train_steps(method, runner, optimizer, 1)
    assert {"task", "olora_orth", "olora_l2"} <= set(terms) and terms["olora_orth"].item() > 0


# --- update projection ------------------------------------------------------------------------------


def test_applied_update_is_removed_from_the_old_subspaces() -> None:
    model, method = _second_task_started()
    delta_w1, delta_w2, delta_key = _projected_step(method, model, 1)
    assert (delta_w1 @ method.bases["input"].vectors).abs().max() < 1e-5
    assert (delta_w2 @ method.bases["hidden"].vectors).abs().max() < 1e-5
    assert (delta_key @ method.bases["output"].vectors).abs().max() < 1e-5


def test_update_outside_the_old_subspaces_is_kept() -> None:
    model, method = _second_task_started()
    delta_w1, _, _ = _projected_step(method, model, 1)
    generator = torch.Generator().manual_seed(7)
    raw = torch.randn(delta_w1.shape, generator=generator)
    torch.testing.assert_close(delta_w1, method.bases["input"].project_out_rows(raw), atol=1e-5, rtol=0)


def test_no_projection_within_the_first_task() -> None:
    model, method = built("gainlora")
    delta_w1, _, _ = _projected_step(method, model, 0)
    expected = torch.randn(delta_w1.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(delta_w1, expected)


def test_restore_row_norm_rescales_rows_to_their_post_step_norms() -> None:
    model, method = _second_task_started(gate={"restore_row_norm": True})
    runner, _ = start_task(method, model, 1)
    w1 = model.gates.gate(1)[0]
    method.before_step(runner)
    _perturb(list(model.gates.gate(1)), seed=7)
    post_step = w1.detach().norm(dim=1).clone()
    method.after_step(runner)
    torch.testing.assert_close(w1.detach().norm(dim=1), post_step)


def test_reloaded_method_projects_identically() -> None:
    model, method = _second_task_started()
    reloaded = GainLoRA(method.config, model, 3)
    reloaded.load_state_tensors(method.state_tensors())
    assert set(method.state_tensors()) == set(reloaded.state_tensors())
    runner, _ = start_task(method, model, 1)
    params = list(model.gates.gate(1))
    start = [p.detach().clone() for p in params]
    results = []
    for instance in (method, reloaded):
        runner.access.write(params, start)
        instance.before_step(runner)
        _perturb(params, seed=7)
        instance.after_step(runner)
        results.append([p.detach().clone() for p in params])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


# --- Proposition 3.1, measured ----------------------------------------------------------------------


@dataclass
class Drift:
    """How task 2's training moved the gates on task-1 inputs."""

    gate_output: float
    """||g_2 after - g_2 before|| / ||g_2 before|| over task-1 inputs."""
    coefficient_before: float
    """max a_2 over task-1 inputs when task 2 starts."""
    coefficient_after: float
    """max a_2 over task-1 inputs after training task 2."""
    frozen_gate: float
    """max |change| of the frozen gate 1's outputs on task-1 inputs."""
    w1_moved: float
    """||W1_2 after - W1_2 before||: the gate did learn."""


def _task_two_drift(threshold: float, *, project: bool = True, full_bases: bool = False) -> Drift:
    """Task 1 (10 steps), then 50 AdamW steps (lr 1e-2) of task 2's gate and branch on task-2 data."""
    model, method = built("gainlora", num_tasks=2, threshold=threshold, gate={"hidden": 32})
    old = task_batches(0, **OLD_TASK)
    learn(method, model, 0, batches=old, steps=10, num_tasks=2)
    runner, optimizer = start_task(method, model, 1, num_tasks=2, lr=1e-2)
    xbar = torch.cat([model.gate_input(b["input_ids"], b["prompt_mask"]) for b in old])
    gates = model.gates
    g2, g1, a2, w1 = _gate_output(gates, 1, xbar), _gate_output(gates, 0, xbar), gates(xbar)[:, 1], gates.gate(1)[0]
    w1 = w1.detach().clone()
    if full_bases:
        _use_full_bases(method, gates, xbar)
    if not project:
        method.bases = {}
    train_steps(method, runner, optimizer, 50)
    drift = Drift(
        gate_output=((_gate_output(gates, 1, xbar) - g2).norm() / g2.norm()).item(),
        coefficient_before=a2.max().item(),
        coefficient_after=gates(xbar)[:, 1].max().item(),
        frozen_gate=(_gate_output(gates, 0, xbar) - g1).abs().max().item(),
        w1_moved=(gates.gate(1)[0].detach() - w1).norm().item(),
    )
    print(f"threshold {threshold}, projection {project}, full bases {full_bases}: {drift}")
    return drift


def test_with_a_full_basis_the_new_gate_ignores_old_inputs() -> None:
    """Bases set to span all of task 1's gate inputs, hidden activations and outputs.

    Measured (torch 2.13, CPU): relative change of g_2 1.8e-7, a_2 2.9e-4 before (the key was designed
    against the method's own threshold basis) and after, frozen gate 1 change 0, while W1_2 moved by 2.8.
    """
    drift = _task_two_drift(1.0, full_bases=True)
    assert drift.w1_moved > 0.5
    assert drift.gate_output < 1e-5
    assert drift.coefficient_before < 1e-3 and drift.coefficient_after < 0.05
    assert drift.frozen_gate == 0.0


def test_with_the_default_threshold_the_drift_on_old_inputs_stays_bounded() -> None:
    """Threshold 0.995 (squared energy, first-task rule of docs/methods.md): on this tiny model the
    hidden and output bases keep a single direction each (the uncentred moments of SiLU activations
    are dominated by their mean), so the protection is partial.

    Measured (torch 2.13, CPU): relative change of g_2 0.20; a_2 0.088 before, 0.85 after; frozen
    gate 1 change 0. Asserted: change < 0.3, against 0.94 without the projection (test below).
    """
    drift = _task_two_drift(0.995)
    assert drift.gate_output < 0.3
    assert drift.frozen_gate == 0.0


def test_without_the_projection_the_new_gate_drifts_on_old_inputs() -> None:
    """The same run with the projection switched off, so the tests above can fail."""
    drift = _task_two_drift(1.0, project=False, full_bases=True)
    assert drift.gate_output > 0.5
    assert drift.coefficient_after > 0.5


@pytest.mark.parametrize("branch", ["olora", "nlora"])
def test_gate_invariance_holds_with_any_branch_method(branch: str) -> None:
    model, method = built("gainlora", branch=branch, threshold=1.0, gate={"hidden": 32})
    old = task_batches(0, **OLD_TASK)
    learn(method, model, 0, batches=old, steps=3)
    runner, optimizer = start_task(method, model, 1, lr=1e-2)
    xbar = torch.cat([model.gate_input(b["input_ids"], b["prompt_mask"]) for b in old])
    _use_full_bases(method, model.gates, xbar)
    before = _gate_output(model.gates, 1, xbar)
    train_steps(method, runner, optimizer, 10)
    after = _gate_output(model.gates, 1, xbar)
    assert ((after - before).norm() / before.norm()).item() < 1e-5
