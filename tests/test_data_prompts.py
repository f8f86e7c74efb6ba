from pathlib import Path

import pytest

from cl_scale.data.benchmark import load_examples
from cl_scale.data.prompts import build_prompt, resolve_template
from cl_scale.errors import CLScaleError


# The first test example of a real task, as the published code prompts it (the last has no definition line).
BYTE_EXACT = {
    "superni": (
        "task363_sst2_polarity_classification", "superni",
        "Definition: In this task, you are given sentences from movie reviews. The task is to classify a sentence "
        'as "POS" if the sentiment of the sentence is positive or as "NEG" if the sentiment of the sentence is '
        "negative\n\nNow complete the following example -\nInput: Making such a tragedy the backdrop to a love "
        "story risks trivializing it , though Chouraqui no doubt intended the film to affirm love 's power to help "
        "people endure almost unimaginable horror .\nOutput: ",
    ),
    "long": (
        "dbpedia", "long",
        "I will give you some category entries from Wikipedia, please classify them by topic.\n"
        "Title: William V. Brady\n"
        "Text:  William Vermilye Brady (July 24 1811\u2013 March 31 1870) was the 68th Mayor of New York City from "
        "1847 to 1848.\n"
        "Output: ",
    ),
    "long_without_definition": (
        "copa", "long",
        'Which sentence is the effect of "The man turned on the faucet."? Choose one between A and B.\n'
        "A: The toilet filled with water.\nB: Water flowed from the spout.\nOutput: ",
    ),
}


@pytest.mark.parametrize(("task", "template", "expected"), BYTE_EXACT.values(), ids=BYTE_EXACT)
def test_prompt_is_byte_exact_on_a_real_example(cl_benchmark: Path, task: str, template: str, expected: str) -> None:
    row = load_examples(cl_benchmark, task, "test")[0]
    assert build_prompt(row["definition"], row["input"], template) == expected


def test_custom_template_fills_each_field_once() -> None:
    prompt = build_prompt("Say it.", "literal {definition}", "[{definition}] {input} =>")
    assert prompt == "[Say it.] literal {definition} =>"


def test_custom_template_without_input_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="no {input} field"):
        build_prompt("d", "x", "{definition} only")


def test_misspelt_template_name_suggests_the_right_one() -> None:
    with pytest.raises(CLScaleError, match="did you mean 'superni'"):
        resolve_template("supernii", "SuperNI")


@pytest.mark.parametrize(
    ("benchmark", "template"), [("SuperNI", "superni"), ("Long_Sequence", "long"), ("Synthetic", "long")]
)
def test_auto_picks_the_published_format_of_the_benchmark(benchmark: str, template: str) -> None:
    assert resolve_template("auto", benchmark) == template


def test_explicit_template_is_kept_whatever_the_benchmark() -> None:
    assert resolve_template("superni", "Long_Sequence") == "superni"


def test_build_prompt_refuses_an_unresolved_auto() -> None:
    with pytest.raises(ValueError, match="resolve_template"):
        build_prompt("d", "x", "auto")
