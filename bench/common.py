"""Timing helpers shared by the benchmarks: interleaved repeats, paired ratios, peak memory, a header.

The machine is shared and noisy, so a benchmark never compares numbers taken at different times:
every case runs once per round, rounds repeat, and a ratio is the median over rounds of the ratio
measured within one round (paired), which cancels slow drifts in the machine's load.

Every call is timed on two clocks: wall time, and this process's CPU time. With one torch thread
(`--threads 1`) the CPU time is the work itself, barely touched by other processes competing for the
cores, so its ratios are the steadier figure on a loaded machine; wall time is what a user waits.

Also what several benchmarks build the same way: their tiny Llama's size options, and one training step
of PEFT LoRA and of a cl-scale method without DeepSpeed (driven as the trainer drives it).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cl_scale.distributed import LocalAccess
from cl_scale.stage_runner import StageRunner

if TYPE_CHECKING:
    from cl_scale.methods.base import Method
    from cl_scale.modeling.wrapper import ContinualModel

Samples = dict[str, list[float]]
"""Seconds per round, by case name."""
Batch = dict[str, torch.Tensor]
"""Model inputs: input_ids, attention_mask, prompt_mask, labels."""
TARGETS = ["q_proj", "v_proj"]
"""The target modules of the benchmarks' LoRA branches, on both sides of a comparison."""


@dataclass
class Timings:
    """The same rounds on both clocks."""

    wall: Samples
    cpu: Samples


def add_timing_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """--repeats, --warmup and --threads, the same in every benchmark."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (every case once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: steady CPU-time ratios on a shared machine)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, for the benchmarks that can run on a GPU."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the models compute: cpu, or cuda (then read the wall ratios: CPU time only launches kernels)",
    )


def add_tiny_llama_arguments(parser: argparse.ArgumentParser, *, hidden: int, heads: int | None = None) -> None:
    """--hidden, --layers, --heads (where the benchmark lets it vary) and --vocab of the tiny Llama it builds."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=4)
    if heads is not None:
        parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--vocab", type=int, default=1024)


def header(title: str, threads: int) -> None:
    """Print what ran where: date, CPU count, torch threads and versions (bench output goes into PERFORMANCE.md)."""
    torch.set_num_threads(threads)
    print(f"# {title}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()}  {os.cpu_count()} cores  "
        f"torch {torch.__version__}  threads {torch.get_num_threads()}  load average {os.getloadavg()[0]:.1f}"
    )
    if torch.cuda.is_available():
        print(f"# GPU {torch.cuda.get_device_name(0)} (used only with --device cuda)")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds one call of `fn` takes (on a GPU, until its kernels have finished)."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(cases: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int) -> Timings:
    """Run every case once per round, `warmup` untimed rounds then `repeats` timed ones.

    The order rotates from round to round, so no case always runs first (or right after a given one).
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = timed(cases[name])
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
    return timings


def median(samples: Samples, name: str) -> float:
    """Median seconds of one case."""
    return statistics.median(samples[name])


def paired_ratio(samples: Samples, name: str, reference: str) -> float:
    """Median over rounds of time(name) / time(reference) measured in the same round."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[reference], strict=True))


def ratio_spread(samples: Samples, name: str, reference: str) -> tuple[float, float]:
    """Lowest and highest per-round ratio, to show how noisy the machine was."""
    ratios = [a / b for a, b in zip(samples[name], samples[reference], strict=True)]
    return min(ratios), max(ratios)


def print_ratios(timings: Timings, rows: list[tuple[str, str, str]]) -> None:
    """One line per (label, case, reference case): medians, paired ratios on both clocks, CPU-ratio range."""
    width = max(28, *(len(label) for label, _, _ in rows))
    print(f"{'':{width}} {'wall s':>8} {'cpu s':>8} {'wall ratio':>11} {'cpu ratio':>10} {'cpu ratio range':>16}")
    for label, name, reference in rows:
        low, high = ratio_spread(timings.cpu, name, reference)
        print(
            f"{label:{width}} {median(timings.wall, name):>8.3f} {median(timings.cpu, name):>8.3f} "
            f"{paired_ratio(timings.wall, name, reference):>11.3f} {paired_ratio(timings.cpu, name, reference):>10.3f} "
            f"{low:>9.3f}-{high:.3f}"
        )


def peak_rss_bytes() -> int:
    """This process's peak resident memory since start or the last `reset_peak_rss` (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux >= 4.0: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peft_step(
    base: torch.nn.Module, batches: Sequence[Batch], *, rank: int, alpha: float, lr: float
) -> Callable[[], None]:
    """A plain training step of PEFT LoRA on `base` (TARGETS, no dropout, AdamW), on the batches' device;
    each call takes the next batch, cycling."""
    from peft import LoraConfig, get_peft_model  # the test extra: only the benchmarks that compare with PEFT need it

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    model = get_peft_model(base, config).to(batches[0]["input_ids"].device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    inputs = itertools.cycle([{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in batches])

    def step() -> None:
        model(**next(inputs)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def method_step(model: ContinualModel, method: Method, batches: Sequence[Batch], *, lr: float) -> Callable[[], None]:
    """A training step of cl-scale `method` on its first task without DeepSpeed (plain AdamW), on the batches'
    device, driven as the trainer drives it: grown, its trainables chosen and `before_task` run once; then
    each call takes the next batch, cycling: `method.loss`, backward, `before_step`, step, `after_step`."""
    method.grow(0, torch.Generator().manual_seed(0))
    model.to(batches[0]["input_ids"].device)
    params = method.trainable_parameters(0)
    runner = StageRunner(0, 1, LocalAccess(), model, list(batches))
    method.before_task(runner)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    inputs = itertools.cycle(batches)

    def step() -> None:
        output = model(**next(inputs))
        loss, _ = method.loss(output.loss, model.context)
        loss.backward()
        method.before_step(runner)
        optimizer.step()
        method.after_step(runner)
        optimizer.zero_grad(set_to_none=True)

    return step
