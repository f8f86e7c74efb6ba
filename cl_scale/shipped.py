"""The recipes and DeepSpeed configs that ship with cl-scale, found from a checkout and from an installed wheel.

The top-level `recipes/` and `ds_configs/` folders are the source of truth (users read and copy them);
a wheel carries copies of both inside the package, under `cl_scale/_shipped/` (setup.py's build step),
read here through importlib.resources. A checkout (or an editable install) reads the folders themselves.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGED = "_shipped"
"""Folder inside the installed package that holds the copies."""
FOLDERS = ("recipes", "ds_configs")
"""The top-level folders that ship."""

_CHECKOUT = Path(__file__).resolve().parent.parent


def shipped_file(relative: str | Path) -> Path | None:
    """The shipped file at `relative` (e.g. `ds_configs/zero3.json`), or None when cl-scale has none."""
    parts = Path(relative).parts
    if not parts or parts[0] not in FOLDERS or ".." in parts:
        return None
    in_checkout = _CHECKOUT.joinpath(*parts)
    if in_checkout.is_file():
        return in_checkout
    packaged = resources.files("cl_scale").joinpath(PACKAGED, *parts)
    # A wheel installs as plain files, so the resource is a real path.
    return Path(str(packaged)) if packaged.is_file() else None
