"""Did-you-mean errors for unknown names, so every lookup failure lists what would have worked."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from cl_scale.errors import CLScaleError


def unknown_name(kind: str, name: str, known: Iterable[str]) -> CLScaleError:
    """An error for an unknown `kind` called `name`, suggesting the closest known names and listing all."""
    choices = sorted(known)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return CLScaleError(f"unknown {kind} {name!r}{hint}", f"known {kind}s: {', '.join(choices)}")
