"""Progress of training steps, data passes and evaluation cells, readable on a terminal and in a log file.

On a terminal: rich bars. Anywhere else (a Slurm log, a pipe) a bar redraws only when it finishes, so a
stage of an hour would print nothing; there each bar writes plain timestamped lines instead, every
`every` items and at least every `interval_s` seconds (checked as items finish), and when it is done.
Only rank 0 shows anything; the other ranks get bars that do nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress


def format_duration(seconds: float) -> str:
    """`1:02:03` (hours unbounded), the way rich's elapsed column writes it."""
    whole = max(round(seconds), 0)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_fields(fields: dict[str, Any]) -> str:
    """`loss 1.2346  lr 5.00e-03`: floats to 4 significant digits, None as `-`."""
    def value(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    return "  ".join(f"{k} {value(v)}" for k, v in fields.items())


class Bar:
    """One counted activity (`label`, `total` items). `update` after each item with the fields to show."""

    def __init__(self, label: str, total: int, *, every: int, interval_s: float, console: Console | None,
                 done: int = 0, rich_progress: Progress | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.every, self.interval_s = label, total, every, interval_s
        self.console, self.rich_progress, self.clock = console, rich_progress, clock
        self.started = self.last_line = clock()
        self.done = self.initial = done  # items done before this bar started (a resumed stage) set no rate
        self.rich_task = None if rich_progress is None else rich_progress.add_task(
            label, total=total, completed=done, info="")

    def remaining_s(self) -> float | None:
        """Seconds left at the rate so far (None before the first item)."""
        per_item = self.seconds_per_item()
        return None if per_item is None else per_item * (self.total - self.done)

    def seconds_per_item(self) -> float | None:
        counted = self.done - self.initial
        return None if counted <= 0 else (self.clock() - self.started) / counted

    def update(self, done: int, fields: dict[str, Any] | None = None) -> None:
        self.done = done
        fields = fields or {}
        if self.console is None:
            return
        if self.rich_progress is not None:
            self.rich_progress.update(self.rich_task, completed=done, info=format_fields(fields))
            return
        now = self.clock()
        due = done % self.every == 0 or done == self.total or now - self.last_line >= self.interval_s
        if not due:
            return
        self.last_line = now
        remaining = self.remaining_s()
        eta = {"eta": None if remaining is None else format_duration(remaining)}
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp}  {self.label}  {done}/{self.total}  {format_fields({**fields, **eta})}"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


class Reporter:
    """Rank 0's progress output: bars on `console` when it is a terminal, plain lines when it is not."""

    def __init__(self, console: Console, *, interval_s: float, enabled: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.interval_s, self.enabled, self.clock = console, interval_s, enabled, clock

    @contextmanager
    def bar(self, label: str, total: int, *, every: int = 1, done: int = 0) -> Iterator[Bar]:
        """A bar of `total` items of which `done` are already done."""
        if not self.enabled:
            yield Bar(label, total, every=every, interval_s=self.interval_s, console=None, done=done, clock=self.clock)
            return
        if not self.console.is_terminal:
            yield Bar(label, total, every=every, interval_s=self.interval_s, console=self.console, done=done,
                      clock=self.clock)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console) as progress:
            yield Bar(label, total, every=every, interval_s=self.interval_s, console=self.console, done=done,
                      rich_progress=progress, clock=self.clock)

    def counted(self, label: str, items: Iterable[Any], total: int) -> Iterator[Any]:
        """`items` passed through, one bar step per item; off a terminal a line when done and at the
        interval (a data pass of a few seconds is one line, one of an hour shows it is alive)."""
        with self.bar(label, total, every=max(total, 1)) as bar:
            for done, item in enumerate(items, start=1):
                yield item
                bar.update(done)


class ReportedBatches:
    """A re-iterable batch source whose every pass shows as a bar (`label` plus the pass number)."""

    def __init__(self, batches: Any, total: int, reporter: Reporter, label: str) -> None:
        self.batches, self.total, self.reporter, self.label = batches, total, reporter, label
        self.passes = 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        return self.reporter.counted(f"{self.label} {self.passes}", iter(self.batches), self.total)
