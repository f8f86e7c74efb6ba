"""One exception type for every user-facing error, so the CLI can print it without a traceback."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


class CLScaleError(Exception):
    """A problem the user can fix: `problem` says what is wrong, `fix` says what to do about it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


REQUEUE_EXIT = 75
"""Exit code of a run a stop signal ended after its checkpoint (EX_TEMPFAIL): slurm/train.sbatch requeues it."""


class StopRequested(Exception):
    """Every rank finished its step and wrote a checkpoint after SIGUSR1/SIGTERM: exit with REQUEUE_EXIT."""


def read_json(path: os.PathLike[str] | str, *, fix: str) -> object:
    """Parse a JSON file; invalid JSON becomes one CLScaleError naming the file, line and column."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise CLScaleError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})", fix) from err


def read_format_json(
    path: os.PathLike[str] | str, expected: str, *, missing: CLScaleError, fix: str,
    other: Callable[[object], CLScaleError],
) -> dict[str, Any]:
    """The JSON object in `path` whose "format" is `expected`: no such file raises `missing`, invalid JSON
    `read_json`'s error (with `fix`), anything else `other(the format found, None if there is none)`."""
    if not os.path.isfile(path):
        raise missing
    data = read_json(path, fix=fix)
    if not isinstance(data, dict) or data.get("format") != expected:
        raise other(data.get("format") if isinstance(data, dict) else None)
    return data


def read_safetensors(path: os.PathLike[str] | str, *, problem: str, fix: str) -> dict:
    """The tensors of a safetensors file; a missing, truncated or foreign file becomes one CLScaleError.

    `problem` says what the file is to the user ("stage snapshot in ... cannot be read"); the reader's own
    reason is appended in parentheses.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CLScaleError(f"{problem} ({err})", fix) from err
