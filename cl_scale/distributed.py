"""Rank helpers and the one place that reads or writes parameters outside a module's forward.

Under ZeRO-3 a parameter outside its module's forward is an empty partition. Every such access
(designing InfLoRA's A, initialising GainLoRA keys, the update projection, snapshots) goes through a
`ParamAccess`: `LocalAccess` for plain single-process modules, `ZeroAccess` for a DeepSpeed engine,
which gathers, and writes both the fp32 master partition and the working copy so they never diverge.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from cl_scale.ds_config import zero_stage
from cl_scale.errors import CLScaleError


def is_distributed() -> bool:
    """True when a process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the rank that prints and writes files."""
    return rank() == 0


STRICT_ENV = "CL_SCALE_STRICT_COLLECTIVES"
"""Set to 1 (the test suite does) to make every collective check where its tensors live."""


class CollectiveDeviceError(RuntimeError):
    """A tensor reached a collective on a device the live backend cannot communicate from."""


def communication_device() -> torch.device:
    """Where the live backend's collectives need their tensors: the rank's GPU under NCCL, the CPU under gloo.

    gloo (and MPI) communicate from host memory; every other backend (NCCL, and a mixed "cpu:gloo,cuda:nccl"
    group, which takes either) from the rank's accelerator.
    """
    if not is_distributed():
        return torch.device("cpu")
    backend = str(dist.get_backend()).lower()
    return torch.device("cpu") if backend in ("gloo", "mpi") else _rank_device()


def _rank_device() -> torch.device:
    """The accelerator device of this local rank (one device per local rank)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accelerator.device_name(), int(os.environ.get("LOCAL_RANK", "0")))


def _bind_rank_device() -> None:
    """Make this local rank's GPU the current device.

    NCCL and the object collectives (`broadcast_object_list`, `all_gather_object`) serialise through the
    *current* CUDA device; left at cuda:0, every rank of a node would talk through the first GPU.
    """
    device = _rank_device()
    if device.type != "cpu":
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().current_device() != device.index:
            get_accelerator().set_device(device.index)


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _run_collective(collective: Callable[..., object], tensor: torch.Tensor, **kwargs: object) -> None:
    """Call the torch.distributed `collective` on `tensor`; in strict mode check the device first.

    gloo accepts tensors on the CPU and NCCL does not, so a test run on gloo cannot see a collective
    that would die on GPUs unless something compares against the backend's device: this does.
    """
    if _strict():
        expected = communication_device()
        if tensor.device != expected:
            raise CollectiveDeviceError(
                f"{getattr(collective, '__name__', collective)} got a tensor on {tensor.device}; the backend communicates "
                f"from {expected} (cl_scale.distributed helpers move tensors there)"
            )
    collective(tensor, **kwargs)


def _multi_rank() -> bool:
    return is_distributed() and world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks (no-op on one rank) and return it, on the device it came from."""
    if not _multi_rank():
        return tensor
    wire = tensor.to(communication_device())
    _run_collective(dist.all_reduce, wire, op=dist.ReduceOp.SUM)
    if wire is not tensor:
        tensor.copy_(wire)
    return tensor


def per_rank(value: float) -> list[float]:
    """`value` as reported by every rank, in rank order (collective: call on every rank)."""
    values = torch.zeros(world_size(), dtype=torch.float64)
    values[rank()] = value
    return all_reduce_sum(values).tolist()


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `tensor` on every rank, whatever shape and dtype the others hold, on the caller's device."""
    if not _multi_rank():
        return tensor
    shape, dtype = broadcast_object((tuple(tensor.shape), tensor.dtype), src=src)  # type: ignore[misc]
    device = communication_device()
    wire = tensor.to(device) if rank() == src else torch.empty(shape, dtype=dtype, device=device)
    _run_collective(dist.broadcast, wire, src=src)
    return wire.to(tensor.device)


def _prepare_object_collective() -> None:
    """Object collectives pickle through a tensor on the current device: bind it, and check it in strict mode."""
    _bind_rank_device()
    if _strict():
        expected = communication_device()
        if expected.type == "cuda" and torch.cuda.current_device() != expected.index:
            raise CollectiveDeviceError(
                f"object collective on cuda:{torch.cuda.current_device()}; this rank communicates from {expected}"
            )


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from `src` to every rank."""
    if not _multi_rank():
        return obj
    _prepare_object_collective()
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=communication_device())
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable `obj`, in rank order."""
    if not _multi_rank():
        return [obj]
    _prepare_object_collective()
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank (no-op on one rank)."""
    if _multi_rank():
        _bind_rank_device()
        dist.barrier()


class ParamAccess(Protocol):
    """Full-value reads and writes of possibly partitioned parameters, identical on every rank."""

    def read(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Full fp32 values; trainable parameters come from the optimizer's fp32 master copy."""

    def write(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        """Set full values into every copy of each parameter (master and working)."""


class LocalAccess:
    """ParamAccess for ordinary, unpartitioned modules."""

    def read(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in params]

    def write(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, value in zip(params, values, strict=True):
                param.copy_(value.to(device=param.device, dtype=param.dtype))


class ZeroAccess:
    """ParamAccess for a model inside a DeepSpeed ZeRO-3 engine. Collective: call on every rank."""

    def read(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        values = []
        for param in params:
            master = safe_get_full_fp32_param(param) if param.requires_grad else None
            values.append(self.read_working([param])[0] if master is None else master.detach().float().cpu().clone())
        return values

    def read_working(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Full values of the working copies, the ones forwards compute with (bf16 in bf16 training), in fp32.

        Snapshots take these: they are what evaluation used and what the next stage starts from, so a
        working copy that fell out of step with its master shows in the snapshot instead of hiding.
        """
        from deepspeed import zero

        values = []
        for param in params:
            with zero.GatheredParameters([param]):
                values.append(param.detach().float().cpu().clone())
        return values

    def write(self, params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
        from deepspeed import zero
        from deepspeed.utils import safe_set_full_fp32_param

        for param, value in zip(params, values, strict=True):
            if param.requires_grad:
                safe_set_full_fp32_param(param, value.to(device=param.device, dtype=torch.float32))
            if not hasattr(param, "ds_id"):  # ZeRO-1/2: every rank holds the whole working copy
                LocalAccess().write([param], [value])
                continue
            with zero.GatheredParameters([param], modifier_rank=0):
                if rank() == 0:
                    with torch.no_grad():
                        param.copy_(value.to(device=param.device, dtype=param.dtype))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_environment(environ: dict[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* for this process, whichever launcher started it.

    The deepspeed launcher and torchrun set them; under `srun` they come from SLURM_*; a plain
    `cl-scale train` is a world of one on a free local port.
    """
    env: dict[str, str] = {}
    if "RANK" not in environ and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        env.update(
            RANK=environ["SLURM_PROCID"],
            WORLD_SIZE=environ["SLURM_NTASKS"],
            LOCAL_RANK=environ.get("SLURM_LOCALID", "0"),
        )
    elif "RANK" not in environ:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in environ:
        env["MASTER_PORT"] = str(_free_port()) if env.get("WORLD_SIZE") == "1" else "29500"
    return env


def init_distributed(timeout_s: float) -> None:
    """Start the process group with DeepSpeed's backend (NCCL on GPUs, gloo on CPU) and a timeout.

    The timeout bounds every collective, so a dead rank ends the job with an error instead of a hang.
    """
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if is_distributed():
        return
    os.environ.update(launcher_environment(dict(os.environ)))
    accelerator = get_accelerator()
    _bind_rank_device()  # before NCCL starts: one GPU per local rank
    if accelerator.device_name() == "cpu":
        _skip_shm_comm_op()
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer_"
"""Name prefix of the per-rank buffers DeepSpeed's CPU shared-memory op writes to /dev/shm (skipped, see
`_skip_shm_comm_op`; the tests check none appear)."""


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling and starting its CPU shared-memory all-reduce op, which cl-scale never calls.

    On CPU, DeepSpeed 0.19's communication backend JIT-compiles `deepspeed_shm_comm` on first use (30-60 s
    on 2 cores) under torch's extension build lock, for `inference_all_reduce` alone; a launch stopped
    during that build left the lock behind and every later launch waited on it forever, silently. Once
    built, the op also wrote a 69 MB buffer per rank to /dev/shm (`DEEPSPEED_SHM_PREFIX`) that nothing
    removed. DeepSpeed loads the op only when its table of compatible ops says yes, and it keeps that
    table in one module-level dict so that edits to it last: marking the op incompatible here skips the
    build, the lock and the buffers. Training collectives go through torch.distributed (gloo) either way.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection (reset|closed)|timed out|timeout", re.IGNORECASE)


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors torch.distributed raises when a peer died or stopped answering."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(error)))


@contextmanager
def explain_collective_failures(timeout_s: float) -> Iterator[None]:
    """Re-raise a failed collective as a CLScaleError that names the likely cause.

    The raw gloo/NCCL message ("Connection reset by peer", "Timed out waiting 20000ms for recv") says
    which socket broke, not that another rank died or hung, which is what the user needs to look for.
    """
    try:
        yield
    except CLScaleError:
        raise
    except Exception as error:
        if world_size() < 2 or not is_collective_failure(error):
            raise
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise CLScaleError(
            f"rank {rank()} of {world_size()}: a collective operation failed, so another rank has died or "
            f"stopped responding (collectives wait at most train.collective_timeout_s = {timeout_s:g} s); "
            f"the backend said: {detail}",
            "find the first error in the other ranks' output; if a rank is only slow (a long data pass, "
            "a slow file system), raise train.collective_timeout_s",
        ) from error


def accelerator_device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, the CPU under gloo."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def accelerator_description() -> dict[str, str]:
    """What this rank computes on and how ranks talk, for the run's manifest ("cuda", "nccl", the GPU's name)."""
    device = accelerator_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    backend = dist.get_backend() if is_distributed() else "none"
    return {"device": device.type, "backend": str(backend), "name": name}


def shutdown_distributed() -> None:
    """Destroy the process group so every rank exits 0 (gloo otherwise aborts at exit).

    Through DeepSpeed, which started it: DeepSpeed keeps the world and data-parallel groups it made, and
    drops them only in its own teardown; after torch's alone, the next engine in the same process (a
    second group, a notebook's second run) failed with "Group ... is not registered".
    """
    import deepspeed.comm

    if is_distributed():
        deepspeed.comm.destroy_process_group()


@contextmanager
def process_group(timeout_s: float) -> Iterator[None]:
    """A process group for the duration: started unless one is up, and then destroyed on every exit path.

    A world of one without a launcher. Whoever opened the group closes it, whether the body returns, raises
    a CLScaleError or is interrupted, so every rank exits with its own code instead of gloo's abort, and
    removes the RANK / WORLD_SIZE / MASTER_* variables it set for a world of one (a process that opens
    groups one after another, or starts launchers, must not inherit a stale port). A failed collective
    inside is explained as a dead or hung peer (`explain_collective_failures`).
    """
    owns_group = not is_distributed()
    added = [k for k in launcher_environment(dict(os.environ)) if k not in os.environ] if owns_group else []
    init_distributed(timeout_s)
    try:
        with explain_collective_failures(timeout_s):
            yield
            if owns_group:
                barrier()  # on success only: no rank tears its connections down while a peer still reads them
    finally:
        if owns_group:
            shutdown_distributed()
            for key in added:  # a world of one's port and ranks must not leak into later groups or child processes
                os.environ.pop(key, None)


def run_on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its result, or its CLScaleError, to every rank."""
    outcome: tuple[str, object]
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except CLScaleError as err:
            outcome = ("error", (err.problem, err.fix))
    else:
        outcome = ("ok", None)
    outcome = broadcast_object(outcome)  # type: ignore[assignment]
    status, value = outcome
    if status == "error":
        problem, fix = value  # type: ignore[misc]
        raise CLScaleError(problem, fix)
    return value


def main_first(fn, *args, **kwargs):
    """Run `fn` on rank 0, then on the others: rank 0 fills shared caches the others then read."""
    if is_main():
        result = fn(*args, **kwargs)
        barrier()
        return result
    barrier()
    return fn(*args, **kwargs)


@contextmanager
def deepspeed_engine(
    model: nn.Module,
    config: dict,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> Iterator[nn.Module]:
    """A DeepSpeed engine around `model` (training with an optimizer, inference without), destroyed on exit.

    The one place engines are made: a stage's training engine and a finished stage's inference engine
    are built and torn down alike, so hooks and partitions never outlive the stage that needed them.
    Under ZeRO-3 the model's transformer blocks are made leaf modules first (`zero3_block_leaves`).
    Collective: every rank enters together.
    """
    import deepspeed

    if zero_stage(config) == 3:
        zero3_block_leaves(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
    try:
        yield engine
    finally:
        engine.destroy()


def zero3_block_leaves(model: nn.Module) -> list[nn.Module]:
    """Make ZeRO-3 gather and release each transformer block whole, not module by module; returns the blocks.

    ZeRO-3 hooks every module it manages, and that Python work was most of the ZeRO-3 engine's cost at
    a world of one (SmolLM2-135M: 518 modules, 646k Python calls a step against PEFT's 14k; with block
    leaves 38 modules, 296k calls, 0.90 of the step; docs/PERFORMANCE.md, section 6). The blocks are the
    classes transformers names in `_no_split_modules` (LlamaDecoderLayer, T5Block): marked as ZeRO-3
    leaves, only they and the modules outside them are hooked, and a block's parameters are fetched in
    one gather, as FSDP wraps a block.
    A leaf's trainable parameters (its LoRA branches) have their gradients reduced by one backward hook
    on the block, which torch fires once the gradient of the block's input is computed, or, where no
    input requires grad, as soon as the output's gradient arrives: before the branches' gradients exist.
    The first block's input comes from the frozen embeddings, so their output is made to require grad
    (transformers' `enable_input_require_grads`). Idempotent; a model that names no blocks is unchanged.
    """
    from deepspeed.utils import set_z3_leaf_modules

    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    classes = list({type(module) for module in model.modules() if type(module).__name__ in names})
    if not classes:
        return []
    blocks = set_z3_leaf_modules(model, classes)
    outermost = next(m for m in model.modules() if hasattr(m, "enable_input_require_grads"))
    if not getattr(outermost, "_require_grads_hooks", None):
        outermost.enable_input_require_grads()
    return blocks


def restart_zero_trace(engine: object) -> None:
    """Make ZeRO-3 record a fresh module trace on the next forward.

    ZeRO-3 prefetches parameters by replaying the module order it recorded on an earlier step. A pass that
    calls modules in another order (a no-grad data pass, generation, the gate bank alone) either
    invalidates that trace on its first mismatch or, where the order matches but the parameters fetched
    differ, fails with "tracing error". So every switch between training steps and such a pass restarts
    the trace: `no_grad_pass` does it on entry and exit, and the trainer before its first step.

    The coordinator hangs off the ZeRO-3 optimizer in a training engine and is the engine's optimizer
    itself (DeepSpeedZeRoOffload) in an inference engine; engines without ZeRO-3 have none.
    """
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None) or (
        optimizer if hasattr(optimizer, "get_param_coordinator") else None
    )
    if offload is None:
        return
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


@contextmanager
def no_grad_pass(target: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode without gradients, with the ZeRO-3 trace restarted around the pass.

    `target` is a DeepSpeed engine (the model it owns is yielded) or a plain model on one device (no trace
    to restart). Every forward that is not a training step (data passes, generation, gate coefficients)
    runs inside this, so no call site can forget the restart; the training mode is restored afterwards.
    """
    engine = target
    module: nn.Module = getattr(target, "module", target)
    was_training = module.training
    module.eval()
    restart_zero_trace(engine)
    try:
        with torch.no_grad():
            yield module
    finally:
        restart_zero_trace(engine)
        module.train(was_training)
