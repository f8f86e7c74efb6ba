"""The prompt formats of the published runs, byte-exact, plus user templates.

Definition and input are stripped of surrounding whitespace before they are placed: the published
collators strip them, and the Long_Sequence files end both fields with a newline that would otherwise
double every line break.
"""

from __future__ import annotations

import re

from cl_scale.data.names import unknown_name
from cl_scale.errors import CLScaleError

TEMPLATE_NAMES = ("auto", "superni", "long")
_FIELD = re.compile(r"\{(definition|input)\}")


def _superni(definition: str, input: str) -> str:
    return f"Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "


def _long(definition: str, input: str) -> str:
    head = f"{definition}\n" if definition else ""
    return f"{head}{input}\nOutput: "


_BUILTIN = {"superni": _superni, "long": _long}


def _check_custom(template: str) -> None:
    """A user template must place the input; a bare word is a misspelt template name."""
    if "{input}" in template:
        return
    if "{" in template:
        raise CLScaleError(
            f"prompt template {template!r} has no {{input}} field",
            "a custom template needs {input} (and may use {definition})",
        )
    raise unknown_name("template", template, TEMPLATE_NAMES)


def resolve_template(template: str, benchmark: str) -> str:
    """The template to use for a benchmark: "auto" picks the published format; others are checked and kept."""
    if template == "auto":
        return "superni" if benchmark == "SuperNI" else "long"
    if template not in _BUILTIN:
        _check_custom(template)
    return template


def build_prompt(definition: str, input: str, template: str) -> str:
    """The prompt text for one example; `template` is "superni", "long" or a string with {definition}/{input}."""
    fields = {"definition": definition.strip(), "input": input.strip()}
    if template in _BUILTIN:
        return _BUILTIN[template](**fields)
    if template == "auto":
        raise ValueError("resolve 'auto' with resolve_template(template, benchmark) before building prompts")
    _check_custom(template)
    return _FIELD.sub(lambda match: fields[match.group(1)], template)
