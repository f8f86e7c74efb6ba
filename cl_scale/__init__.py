"""cl-scale: continual learning of LLMs with LoRA-branch methods on DeepSpeed ZeRO-3."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {"load_run": "cl_scale.local_stage", "load_exported": "cl_scale.exported"}
"""Notebook entry points, imported on first use so `import cl_scale` (and the CLI) never waits for torch."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cl_scale' has no attribute {name!r}")
