"""Progress output: plain timestamped lines off a terminal (every N items, at least every interval, when
done), rich bars on a terminal, nothing on ranks other than 0; known third-party warnings shown once."""

from __future__ import annotations

import io
import re
import warnings

import pytest
from rich.console import Console

from cl_scale.progress import Reporter, format_duration
from cl_scale import warnings_filter
from cl_scale.warnings_filter import KNOWN, quiet_known_warnings

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  train  (\d+)/10  (.*)$")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _console(*, terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=160), out


def _run(reporter: Reporter, clock: Clock, *, every: int, step_s: list[float]) -> None:
    with reporter.bar("train", 10, every=every) as bar:
        for done, seconds in enumerate(step_s, start=1):
            clock.now += seconds
            bar.update(done, {"loss": 1.5 / done, "lr": 5e-3, "grad_norm": None})


def test_plain_lines_every_n_items_and_at_the_end_with_eta() -> None:
    console, out = _console(terminal=False)
    clock = Clock()
    _run(Reporter(console, interval_s=60, enabled=True, clock=clock), clock, every=3, step_s=[1.0] * 10)
    lines = out.getvalue().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [3, 6, 9, 10]
    first = matches[0].group(2)
    assert f"loss {1.5 / 3:.4g}" in first and "lr 0.005" in first and "grad_norm -" in first
    assert first.endswith(f"eta {format_duration(7.0)}")  # 3 items in 3 s, 7 left
    assert matches[-1].group(2).endswith("eta 0:00:00")


def test_plain_line_when_the_interval_passes_between_multiples() -> None:
    console, out = _console(terminal=False)
    clock = Clock()
    steps = [1.0, 1.0, 61.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    _run(Reporter(console, interval_s=60, enabled=True, clock=clock), clock, every=100, step_s=steps)
    shown = [int(LINE.match(line).group(1)) for line in out.getvalue().splitlines()]
    assert shown == [3, 10]


def test_terminal_draws_a_bar_and_no_plain_lines() -> None:
    console, out = _console(terminal=True)
    clock = Clock()
    _run(Reporter(console, interval_s=60, enabled=True, clock=clock), clock, every=3, step_s=[1.0] * 10)
    text = out.getvalue()
    assert "10/10" in text and "\x1b[" in text  # a rendered bar with terminal control codes
    assert not any(LINE.match(line) for line in text.splitlines())


def test_other_ranks_show_nothing() -> None:
    for terminal in (False, True):
        console, out = _console(terminal=terminal)
        clock = Clock()
        _run(Reporter(console, interval_s=60, enabled=False, clock=clock), clock, every=1, step_s=[1.0] * 10)
        assert out.getvalue() == ""


def test_data_pass_is_one_line_when_short() -> None:
    console, out = _console(terminal=False)
    items = list(Reporter(console, interval_s=60, enabled=True).counted("pass", iter(range(7)), 7))
    assert items == list(range(7))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "pass  7/7" in lines[0]


def _known_message() -> str:
    _, pattern = KNOWN[0]
    return pattern.replace("\\", "") + ". Please use something else."


def _emit(message: str, category: type[Warning], times: int) -> None:
    for _ in range(times):
        warnings.warn(message, category, stacklevel=1)
        warnings.filterwarnings("default", message="unrelated")  # what libraries do; resets "already shown"


@pytest.mark.parametrize("main", [True, False])
def test_known_warning_once_on_rank_zero_and_never_elsewhere(main: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warnings_filter, "_shown", set())  # what an earlier test showed must not count here
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        quiet_known_warnings(main=main)
        _emit(_known_message(), KNOWN[0][0], 5)
        _emit(_known_message() + " Another text.", KNOWN[0][0], 2)
    assert len(caught) == (2 if main else 0)


def test_other_warnings_still_show_every_time_they_would() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        quiet_known_warnings(main=False)
        _emit("a real problem", UserWarning, 3)
    assert len(caught) == 3  # every filter edit clears Python's registry, so "default" shows it again


def test_without_the_filter_the_known_warning_repeats() -> None:
    """The reference for the test above: Python's default filter alone shows it on every reset."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        _emit(_known_message(), KNOWN[0][0], 5)
    assert len(caught) == 5
