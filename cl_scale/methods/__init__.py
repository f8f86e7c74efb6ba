"""The continual-learning methods, built by name from the recipe's method section."""

from __future__ import annotations

from typing import Any

from cl_scale.errors import CLScaleError
from cl_scale.methods.base import Method, TaskRunner
from cl_scale.methods.gainlora import BRANCH_METHODS, GainLoRA
from cl_scale.methods.inclora import IncLoRA
from cl_scale.methods.seqlora import SeqLoRA
from cl_scale.modeling.wrapper import ContinualModel

METHODS: dict[str, type[Method]] = {"seqlora": SeqLoRA, "inclora": IncLoRA, **BRANCH_METHODS, "gainlora": GainLoRA}


def build_method(config: Any, model: ContinualModel, num_tasks: int) -> Method:
    """The method `config.name` for `model` over a task order of length `num_tasks`."""
    if config.name not in METHODS:
        raise CLScaleError(f"unknown method {config.name!r}", f"set method.name to one of {', '.join(METHODS)}")
    return METHODS[config.name](config, model, num_tasks)


__all__ = ["METHODS", "Method", "TaskRunner", "build_method"]
