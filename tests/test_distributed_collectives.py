"""The collective rule: every collective goes through cl_scale.distributed, on the backend's device.

gloo takes CPU tensors and NCCL does not, so on a CPU machine the strict mode (which every launched test
process runs with) compares each collective's tensor with the communication device. These tests point
that device elsewhere to show the mode catches what NCCL would reject, and that the helpers move
tensors there themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cl_scale import distributed as dist_utils

PACKAGE = Path(dist_utils.__file__).resolve().parent


class _Reached(Exception):
    """Raised by a stand-in collective: the call got past the strict check with this tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(str(tensor.device))
        self.device = tensor.device


@pytest.fixture
def fake_gpu_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks whose backend communicates from the meta device (a stand-in for a GPU), strict mode on."""
    monkeypatch.setenv(dist_utils.STRICT_ENV, "1")
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: True)
    monkeypatch.setattr(dist_utils, "world_size", lambda: 2)
    monkeypatch.setattr(dist_utils, "rank", lambda: 0)
    monkeypatch.setattr(dist_utils, "communication_device", lambda: torch.device("meta"))

    def reached(tensor: torch.Tensor, **_: object) -> None:
        raise _Reached(tensor)

    for name in ("all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, reached)


def _per_rank_as_it_was(value: float) -> list[float]:
    """per_rank before the rule: a CPU tensor straight into the collective (died on NCCL in stage 1)."""
    values = torch.zeros(dist_utils.world_size(), dtype=torch.float64)
    values[dist_utils.rank()] = value
    dist_utils._run_collective(dist.all_reduce, values, op=dist.ReduceOp.SUM)
    return values.tolist()


def test_strict_mode_rejects_a_cpu_tensor_when_the_backend_communicates_from_elsewhere(fake_gpu_world: None) -> None:
    with pytest.raises(dist_utils.CollectiveDeviceError, match="cpu.*meta"):
        _per_rank_as_it_was(1.0)


def test_strict_mode_is_off_without_the_variable(fake_gpu_world: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dist_utils.STRICT_ENV)
    with pytest.raises(_Reached):  # the unchecked CPU tensor reaches the collective, as it did before
        _per_rank_as_it_was(1.0)


def test_per_rank_hands_the_collective_a_tensor_on_the_communication_device(fake_gpu_world: None) -> None:
    with pytest.raises(_Reached) as reached:
        dist_utils.per_rank(1.0)
    assert reached.value.device.type == "meta"


def test_all_reduce_sum_moves_a_cpu_tensor_to_the_communication_device(fake_gpu_world: None) -> None:
    with pytest.raises(_Reached) as reached:
        dist_utils.all_reduce_sum(torch.ones(3))
    assert reached.value.device.type == "meta"


def test_broadcast_moves_a_cpu_tensor_to_the_communication_device(
    fake_gpu_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dist_utils, "broadcast_object", lambda obj, src=0: obj)
    with pytest.raises(_Reached) as reached:
        dist_utils.broadcast(torch.ones(3))
    assert reached.value.device.type == "meta"


def test_helpers_skip_collectives_in_a_world_of_one() -> None:
    tensor = torch.ones(2)
    assert dist_utils.all_reduce_sum(tensor) is tensor
    assert dist_utils.broadcast(tensor) is tensor
    assert dist_utils.per_rank(2.5) == [2.5]
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]


def _direct_distributed_uses(path: Path) -> list[str]:
    """Every import of torch.distributed / deepspeed.comm and every `torch.distributed.X` in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith(("torch.distributed", "deepspeed.comm"))]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {a.name for a in node.names}
            if module.startswith(("torch.distributed", "deepspeed.comm")) or (
                module in ("torch", "deepspeed") and names & {"distributed", "comm"}
            ):
                found.append(f"from {module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append(f"torch.distributed (line {node.lineno})")
    return found


def test_only_the_distributed_module_touches_torch_distributed() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "distributed.py" and (uses := _direct_distributed_uses(path))
    }
    assert offenders == {}, f"collectives outside cl_scale/distributed.py: {offenders}"


def test_the_scan_finds_a_direct_collective(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nfrom torch import distributed\ntorch.distributed.all_gather_object([], 1)\n")
    assert len(_direct_distributed_uses(sample)) == 2
    assert _direct_distributed_uses(PACKAGE / "distributed.py"), "the scan must see distributed.py's own import"


@pytest.mark.parametrize("raised", [None, "CLScaleError", "KeyboardInterrupt"])
def test_process_group_is_destroyed_on_every_exit_path(raised: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from cl_scale.errors import CLScaleError

    events: list[str] = []
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: bool(events) and events[-1] == "init")
    monkeypatch.setattr(dist_utils, "init_distributed", lambda timeout_s: events.append("init"))
    monkeypatch.setattr(dist_utils, "shutdown_distributed", lambda: events.append("shutdown"))
    monkeypatch.setattr(dist_utils, "barrier", lambda: events.append("barrier"))
    error = {"CLScaleError": CLScaleError("bad input", "fix it"), "KeyboardInterrupt": KeyboardInterrupt()}.get(raised or "")
    try:
        with dist_utils.process_group(timeout_s=5):
            if error is not None:
                raise error
    except (CLScaleError, KeyboardInterrupt) as caught:
        assert caught is error, "the error must reach the caller unchanged (it sets the exit code)"
    # every rank meets before a successful teardown; after an error a peer may be gone, so no barrier then
    assert events == (["init", "barrier", "shutdown"] if error is None else ["init", "shutdown"])


def test_process_group_leaves_a_group_it_did_not_open(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: True)
    monkeypatch.setattr(dist_utils, "init_distributed", lambda timeout_s: events.append("init"))
    monkeypatch.setattr(dist_utils, "shutdown_distributed", lambda: events.append("shutdown"))
    with dist_utils.process_group(timeout_s=5):
        pass
    assert events == ["init"], "the launcher's (or the demo's) group must outlive an inner run"


def test_process_group_removes_the_launcher_variables_it_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for key in names:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: False)
    monkeypatch.setattr(  # what the real one does to the environment, without a group in the test process
        dist_utils, "init_distributed", lambda timeout_s: os.environ.update(dist_utils.launcher_environment(dict(os.environ)))
    )
    monkeypatch.setattr(dist_utils, "shutdown_distributed", lambda: None)
    with dist_utils.process_group(timeout_s=30):
        inside = {k: os.environ.get(k) for k in names}
    assert inside["RANK"] == "0" and inside["WORLD_SIZE"] == "1" and inside["MASTER_PORT"], "a world of one was set up"
    left = {k: os.environ[k] for k in names if k in os.environ}
    assert left == {}, f"the group's launcher variables outlived it: {left}"


def test_a_second_group_in_one_process_builds_a_zero3_engine() -> None:
    """DeepSpeed keeps the groups it made; tearing the first group down through torch alone left them
    stale, and the second engine failed with "Group ... is not registered" (a notebook's second run)."""
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    losses = []
    for _ in range(2):
        with dist_utils.process_group(timeout_s=30):
            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            with dist_utils.deepspeed_engine(model, config, optimizer=optimizer) as engine:
                loss = engine(torch.ones(1, 4)).sum()
                engine.backward(loss)
                engine.step()
                losses.append(float(loss))
        assert not dist_utils.is_distributed()
    assert len(losses) == 2
