"""Third-party warnings that tell a cl-scale user nothing: shown once per process, by rank 0 only.

DeepSpeed calls torch.distributed functions that torch has deprecated. Python forgets which warnings it
has shown whenever any library edits the warning filters (both "default" and "once" keep their records
under the filters' version), so a log filled with copies of such a warning, each with a line of source.
The messages below are matched exactly and shown once, on one line, by rank 0 and never by the other
ranks; every other warning keeps Python's behaviour on every rank.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, TextIO

KNOWN: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._reduce_scatter_base` is a private function"),
    (FutureWarning, r"`torch\.distributed\._all_gather_base` is a private function"),
)
"""(category, regex matched at the start of the message) of the warnings shown once."""

_shown: set[tuple[type[Warning], str]] = set()


def _is_known(message: Warning | str, category: type[Warning]) -> bool:
    return any(issubclass(category, c) and re.match(p, str(message)) for c, p in KNOWN)


def _show_known_once(show: Any) -> Any:
    """`warnings.showwarning` that passes a known warning on once, without its source line."""

    def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        if _is_known(message, category):
            key = (category, str(message))
            if key in _shown:
                return
            _shown.add(key)
            line = ""
        show(message, category, filename, lineno, file, line)

    showwarning.shows_known_once = True  # type: ignore[attr-defined]
    return showwarning


def quiet_known_warnings(*, main: bool) -> None:
    """On rank 0 every known warning reaches `showwarning`, which shows each text once; elsewhere none does."""
    for category, message in KNOWN:
        warnings.filterwarnings("always" if main else "ignore", message=message, category=category)
    if main and not getattr(warnings.showwarning, "shows_known_once", False):
        warnings.showwarning = _show_known_once(warnings.showwarning)
