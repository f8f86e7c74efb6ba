"""Where cl-scale keeps what it builds or downloads once: $CL_SCALE_CACHE, else ~/.cache/cl-scale."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder: $CL_SCALE_CACHE, else ~/.cache/cl-scale (never the repo)."""
    return Path(os.environ.get("CL_SCALE_CACHE", Path.home() / ".cache" / "cl-scale"))
