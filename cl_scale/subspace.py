"""Subspace memory shared by InfLoRA and GainLoRA: second moments, GPM extension, projectors.

Everything here is the math of docs/methods.md "Subspace memory" and nothing else, so the methods only
say *which* statistic feeds *which* basis.

- Statistics: `SecondMoment` sums `z z^T` over real (unpadded) positions; collectors attach it to
  branched layers (forward pre-hooks) or to the gate bank (its observer); `layer_statistics` bounds
  memory by collecting `per_pass` layers per data pass.
- Decompositions run in float64 with deterministic signs (largest-|entry| of each direction positive),
  and `Basis` broadcasts rank 0's result, so every rank holds bitwise identical bases and designs.
- A direction with an energy is computed inside the orthogonal complement of the old basis, so new
  directions are orthogonal to it to machine precision even where `(I - U U^T) C` is rank-deficient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cl_scale.distributed import all_reduce_sum, broadcast
from cl_scale.errors import CLScaleError
from cl_scale.modeling.branched_linear import BranchedLinear
from cl_scale.modeling.context import BranchContext
from cl_scale.modeling.gates import GateBank

ENERGIES = ("squared", "classic")
"""Spectrum energy: "squared" eigenvalues of C (the published runs, default) or "classic" GPM eigenvalues."""


class SecondMoment:
    """Running `sum z z^T` and count over the real positions of a layer's inputs; `value()` = sum / count.

    Precision: float64 throughout (products and running sum). The sum runs over up to millions of
    tokens and, across ranks, in an order that depends on the world size; float64 keeps 1-rank and
    N-rank statistics equal to ~1e-15 relative and puts the numerical null space of C at ~1e-16, so
    "all the energy" (threshold 1) means the data's span and not float32 noise directions. It costs
    no time on data-centre GPUs (FP64 tensor-core matmuls run at the FP32 rate: 67 TFLOPS on H100,
    19.5 on A100) but 8 d^2 bytes per layer (210 MB at d = 5120), which `stats_modules_per_pass` bounds.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        """Sums live on `device`, or, when None, on the device of the first inputs (the compute device,
        which collectives need, even where ZeRO-3 keeps the parameters elsewhere)."""
        self.dim = dim
        self.sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        self.sum = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate the rows of `z` (..., d) whose `mask` (z's leading dims) is non-zero; no mask = all."""
        if self.sum is None:
            self._allocate(z.device)
        rows = z.detach().reshape(-1, z.shape[-1])
        if mask is not None:
            if tuple(mask.shape) != tuple(z.shape[:-1]):
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not cover inputs of shape {tuple(z.shape)}")
            rows = rows[mask.reshape(-1).to(rows.device).bool()]
        rows = rows.to(device=self.sum.device, dtype=torch.float64)
        self.sum += rows.T @ rows
        self.count += rows.shape[0]

    def reduce(self) -> None:
        """Sum the statistic over all ranks (collective: every rank calls it in the same order)."""
        if self.sum is None:
            raise RuntimeError("this rank saw no inputs; every rank must run the same number of batches")
        all_reduce_sum(self.sum)
        all_reduce_sum(self.count)

    def value(self) -> torch.Tensor:
        """The uncentred second moment (d, d) in float64."""
        if self.sum is None or self.count.item() == 0:
            raise CLScaleError(
                "a subspace statistic saw no real tokens: the task's training data is empty or all padding",
                "check the task's training split (`cl-scale data check`)",
            )
        return self.sum / self.count


def _input_hook(moment: SecondMoment, context: BranchContext) -> Callable[[BranchedLinear, tuple], None]:
    """A forward pre-hook adding a layer's input rows, masked by the context mask of the layer's stream."""

    def hook(layer: BranchedLinear, args: tuple) -> None:
        mask = context.masks.get(layer.stream)
        if mask is None:
            raise RuntimeError(f"no {layer.stream!r} token mask in the context; padding cannot be excluded")
        moment.add(args[0], mask)

    return hook


@contextmanager
def collect_layer_inputs(
    layers: dict[str, BranchedLinear], masks_from: BranchContext
) -> Iterator[dict[str, SecondMoment]]:
    """Second moments of the inputs of `layers` over the forwards run inside the block, reduced on exit."""
    moments = {name: SecondMoment(layer.in_features) for name, layer in layers.items()}
    handles = [
        layer.register_forward_pre_hook(_input_hook(moments[name], masks_from)) for name, layer in layers.items()
    ]
    try:
        yield moments
    finally:
        for handle in handles:
            handle.remove()
    for moment in moments.values():
        moment.reduce()


def layer_statistics(
    layers: dict[str, BranchedLinear],
    masks_from: BranchContext,
    data_pass: Callable[[], None],
    per_pass: int | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, C) for every layer, running `data_pass` once per group of `per_pass` layers (None: all).

    Only one group's statistics exist at a time, so memory stays at `per_pass` d x d matrices whatever
    the model's depth, at the price of one data pass per group.
    """
    names = list(layers)
    size = per_pass or max(len(names), 1)
    for start in range(0, len(names), size):
        group = {name: layers[name] for name in names[start : start + size]}
        with collect_layer_inputs(group, masks_from) as moments:
            data_pass()
        for name in group:
            yield name, moments.pop(name).value()


@dataclass
class GateMoments:
    """Second moments of the newest gate's input `xbar` (d), hidden activations (h) and outputs (d)."""

    input: SecondMoment
    hidden: SecondMoment
    output: SecondMoment

    def add(self, xbar: torch.Tensor, hidden: torch.Tensor, output: torch.Tensor) -> None:
        """The gate bank's observer: one row per sample."""
        self.input.add(xbar)
        self.hidden.add(hidden)
        self.output.add(output)

    def reduce(self) -> None:
        """Sum all three over the ranks (collective)."""
        for moment in (self.input, self.hidden, self.output):
            moment.reduce()


@contextmanager
def collect_gate_moments(gates: GateBank) -> Iterator[GateMoments]:
    """Moments of the newest gate over the forwards run inside the block, reduced on exit."""
    moments = GateMoments(SecondMoment(gates.d_model), SecondMoment(gates.hidden), SecondMoment(gates.d_model))
    previous = gates.observer
    gates.observer = moments.add
    try:
        yield moments
    finally:
        gates.observer = previous
    moments.reduce()


def _fix_signs(directions: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-|entry| is positive: SVD signs are arbitrary and device-dependent."""
    if directions.shape[1] == 0:
        return directions
    rows = directions.abs().argmax(dim=0)
    signs = torch.sign(directions[rows, torch.arange(directions.shape[1], device=directions.device)])
    return directions * torch.where(signs == 0, torch.ones_like(signs), signs)


def _left_singular(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (sign-fixed) and singular values of `m`, in float64, largest first."""
    u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
    return _fix_signs(u), s


def top_directions(m: torch.Tensor, k: int) -> torch.Tensor:
    """The top-`k` left singular vectors of `m` as columns (float64, deterministic signs).

    Taken as the leading eigenvectors of `m m^T` (`eigh`), not from an SVD: only k directions are
    needed, never the small singular values whose accuracy the squaring would cost. On a 4080 x 4096
    float64 matrix (d = 4096 outside a 16-direction basis, one CPU thread) this took 20.6 s against the
    SVD's 31.8 s, with the same 8 leading directions; InfLoRA designs one A this way per target module
    per task (64 at Llama-2-7B).
    """
    if k > min(m.shape):
        raise ValueError(f"asked for {k} directions of a matrix with only {min(m.shape)}")
    m = m.double()
    _, vectors = torch.linalg.eigh(m @ m.T)  # ascending eigenvalues
    return _fix_signs(vectors[:, -k:].flip(1))


def _complement(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns (d, d - k) spanning the orthogonal complement of the columns of `u` (d, k)."""
    d, k = u.shape
    if k == 0:
        return torch.eye(d, dtype=u.dtype, device=u.device)
    q, _ = torch.linalg.qr(u, mode="complete")
    return q[:, k:]


def threshold_at(threshold: float, task_index: int, num_tasks: int) -> float:
    """eps_t = eps + (1 - eps) t / T for the 0-based task index t."""
    return threshold + (1.0 - threshold) * task_index / num_tasks


def _check_energy(energy: str) -> None:
    if energy not in ENERGIES:
        raise CLScaleError(f"unknown subspace energy {energy!r}", f"use one of {', '.join(ENERGIES)}")


def extend_basis(
    u: torch.Tensor,
    c: torch.Tensor,
    *,
    threshold: float,
    task_index: int,
    num_tasks: int,
    energy: str = "squared",
) -> torch.Tensor:
    """The old basis `u` (d, k) with the GPM rule's new directions for the second moment `c` appended.

    Directions and energies come from the part of `c` outside span(u), decomposed in the complement
    Q (d, d - k) of u: "squared" takes the left singular vectors of Q^T C with energies sigma^2 (= the
    SVD of (I - U U^T) C of the reference, E = sum lambda^2 = ||C||_F^2); "classic" those of
    Q^T C Q with energies sigma (= GPM on the activations, E = sum lambda = trace C).
    First task (u empty), as docs/methods.md and the reference code: keep the leading directions while
    the cumulative energy fraction (of the energies' own sum), the direction itself included, stays
    below eps_t (at least one; so at eps_t = 1 the weakest direction of the data is left out, as in the
    published runs).
    Later tasks: acc = (E - sum_j m_j) / E and u_j is appended in order while acc < eps_t, adding m_j / E.
    Directions whose singular value is at float64 noise level (<= d * eps64 * ||C||_F) carry no energy
    and are never appended, so eps_t = 1 yields the span of the data rather than the whole space.
    At most d - k directions exist, so the basis never exceeds d. Returns float64.
    """
    _check_energy(energy)
    c = c.double()
    u = u.to(device=c.device, dtype=torch.float64)
    total = (c * c).sum() if energy == "squared" else torch.trace(c)
    if u.shape[1] == c.shape[0] or total.item() <= 0:
        return u
    q = _complement(u)
    reduced = q.T @ c if energy == "squared" else q.T @ c @ q
    directions, singular = _left_singular(reduced)
    noise = c.shape[0] * torch.finfo(torch.float64).eps * torch.linalg.matrix_norm(c)
    singular = torch.where(singular > noise, singular, torch.zeros_like(singular))
    energies = singular**2 if energy == "squared" else singular
    eps_t = threshold_at(threshold, task_index, num_tasks)
    if u.shape[1] == 0:  # first task: the kept fraction, this direction included, stays below eps_t
        cumulative = torch.cumsum(energies, 0)
        kept = cumulative / cumulative[-1]  # one sum on both sides, so the last direction is exactly 1
        count = max(int(((kept < eps_t) & (energies > 0)).sum().item()), 1)
    else:  # later tasks: acc starts at the energy already inside span(u), checked before each append
        start = (total - energies.sum()) / total
        acc_before = start + (torch.cumsum(energies, 0) - energies) / total
        count = int(((acc_before < eps_t) & (energies > 0)).sum().item())  # a prefix: acc grows along j
    new = _fix_signs(q @ directions[:, :count])
    return torch.cat([u, new], dim=1)


def agree(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of `tensor` on every rank (collective), so decompositions cannot drift apart.

    A broadcast, not a sum with zeros: a rank whose own result has another shape still ends with rank 0's.
    """
    return broadcast(tensor, src=0)


class Basis:
    """Orthonormal columns U (d, k), k possibly 0, spanning the input space old tasks used.

    Stored in float32 on the CPU: a basis can be as large as a second moment, and the update
    projection reads parameters on the CPU under ZeRO-3 anyway.
    """

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors = vectors

    @classmethod
    def empty(cls, dim: int) -> Basis:
        return cls(torch.zeros(dim, 0))

    @property
    def dim(self) -> int:
        return self.vectors.shape[0]

    @property
    def size(self) -> int:
        """Number of directions k."""
        return self.vectors.shape[1]

    def _on(self, like: torch.Tensor) -> torch.Tensor:
        return self.vectors.to(device=like.device, dtype=like.dtype)

    def projector(self) -> torch.Tensor:
        """P = U U^T (d, d)."""
        return self.vectors @ self.vectors.T

    def project_out(self, m: torch.Tensor) -> torch.Tensor:
        """(I - U U^T) M: removes the basis from the columns of M (d, n) (or from a vector (d,))."""
        u = self._on(m)
        return m - u @ (u.T @ m)

    def project_out_rows(self, m: torch.Tensor) -> torch.Tensor:
        """M (I - U U^T): removes the basis from the rows of M (n, d) (or from a vector (d,))."""
        u = self._on(m)
        return m - (m @ u) @ u.T

    def require_room(self, k: int) -> None:
        """Fail clearly when fewer than `k` dimensions lie outside the basis (a new branch needs k)."""
        if self.dim - self.size < k:
            raise CLScaleError(
                f"old tasks' subspace fills {self.size} of {self.dim} input dimensions, leaving fewer than the {k} "
                "directions a new task needs",
                "lower method.threshold or method.rank",
            )

    def leading_outside(self, c: torch.Tensor, k: int) -> torch.Tensor:
        """Top-k left singular vectors (d, k) of (I - U U^T) C, exactly orthogonal to U; float64, same on all ranks."""
        self.require_room(k)
        q = _complement(self.vectors.to(device=c.device, dtype=torch.float64))
        return agree(_fix_signs(q @ top_directions(q.T @ c.double(), k)))

    def extended(self, c: torch.Tensor, *, threshold: float, task_index: int, num_tasks: int, energy: str) -> Basis:
        """This basis grown by `extend_basis` with the statistic `c` (computed on c's device, kept on the CPU)."""
        u = extend_basis(
            self.vectors, c, threshold=threshold, task_index=task_index, num_tasks=num_tasks, energy=energy
        )
        return Basis(agree(u).float().cpu())
