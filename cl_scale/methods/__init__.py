"""The continual-learning methods, built by name from the recipe's method section.

The registry names each method's class without importing it, so the recipe can check method names
without torch; a method's facts (label, gates, what trains, parameter counts) live on its class.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cl_scale.errors import CLScaleError

if TYPE_CHECKING:
    from cl_scale.methods.base import Method
    from cl_scale.modeling.wrapper import ContinualModel
    from cl_scale.recipe import MethodConfig

_CLASSES: dict[str, str] = {
    "gainlora": "cl_scale.methods.gainlora:GainLoRA",
    "inflora": "cl_scale.methods.inflora:InfLoRA",
    "olora": "cl_scale.methods.olora:OLoRA",
    "nlora": "cl_scale.methods.nlora:NLoRA",
    "inclora": "cl_scale.methods.inclora:IncLoRA",
    "seqlora": "cl_scale.methods.seqlora:SeqLoRA",
}
METHOD_NAMES: tuple[str, ...] = tuple(_CLASSES)
"""Every method.name a recipe may give."""
BRANCH_NAMES: tuple[str, ...] = ("inflora", "olora", "nlora")
"""The methods GainLoRA can take its branches from (method.branch)."""


def method_class(name: str) -> type[Method]:
    """The class of method `name` (imported on first use)."""
    if name not in _CLASSES:
        raise CLScaleError(f"unknown method {name!r}", f"set method.name to one of {', '.join(METHOD_NAMES)}")
    module, _, attribute = _CLASSES[name].partition(":")
    found: type[Method] = getattr(importlib.import_module(module), attribute)
    return found


def build_method(config: MethodConfig, model: ContinualModel, num_tasks: int) -> Method:
    """The method `config.name` for `model` over a task order of length `num_tasks`."""
    return method_class(config.name)(config, model, num_tasks)


__all__ = ["BRANCH_NAMES", "METHOD_NAMES", "build_method", "method_class"]
