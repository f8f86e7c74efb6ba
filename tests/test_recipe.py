"""The recipe schema: loading, overrides, error messages, round trips and diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_scale.errors import CLScaleError
from cl_scale.recipe import (
    DeepSpeedConfig,
    Recipe,
    apply_overrides,
    diff_recipes,
    load_recipe,
    parse_override,
    recipe_to_dict,
    recipe_to_yaml,
)

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """\
model:
  path: builtin:tiny-llama
data:
  root: builtin:synthetic
  order: synthetic_demo
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> CLScaleError:
    with pytest.raises(CLScaleError) as caught:
        load_recipe(path, overrides)
    return caught.value


# --- overrides ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("train.epochs=3", 3),
        ("train.lr=1e-4", 1e-4),
        ("train.lr=2E5", 2e5),
        ("train.lr=1.5e-3", 1.5e-3),
        ("train.tensorboard=true", True),
        ("data.tasks=[a,b]", ["a", "b"]),
        ("data.order=null", None),
        ("model.path=builtin:tiny-llama", "builtin:tiny-llama"),
    ],
)
def test_override_values_are_typed_by_yaml_rules(text: str, value: object) -> None:
    key, parsed = parse_override(text)
    assert key == text.partition("=")[0].split(".")
    assert parsed == value and type(parsed) is type(value)


def test_override_without_equals_sign_names_the_expected_form() -> None:
    with pytest.raises(CLScaleError, match="malformed override `train.lr`") as caught:
        parse_override("train.lr")
    assert "dotted.key=value" in caught.value.fix


def test_override_with_an_empty_key_part_is_malformed() -> None:
    with pytest.raises(CLScaleError, match="malformed override"):
        parse_override("train..lr=1")


def test_apply_overrides_creates_missing_sections() -> None:
    assert apply_overrides({}, ["method.gate.hidden=64"]) == {"method": {"gate": {"hidden": 64}}}


def test_apply_overrides_leaves_the_input_untouched() -> None:
    data = {"train": {"lr": 0.1}}
    apply_overrides(data, ["train.lr=0.2"])
    assert data == {"train": {"lr": 0.1}}


def test_override_below_a_plain_value_is_refused() -> None:
    with pytest.raises(CLScaleError, match="`model.path` is a value"):
        apply_overrides({"model": {"path": "x"}}, ["model.path.deep=1"])


def test_overrides_replace_file_values(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ["train.lr=1e-4", "method.gate.hidden=64"])
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.method.gate.hidden == 64


def test_later_override_wins(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ["method.rank=4", "method.rank=16"])
    assert recipe.method.rank == 16


# --- loading -----------------------------------------------------------------------------------


def test_exponent_float_in_file_loads_as_float(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL + "train:\n  lr: 1e-4\n"))
    assert recipe.train.lr == pytest.approx(1e-4)


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    assert load_recipe(write(tmp_path, MINIMAL, "my_run.yaml")).name == "my_run"


def test_explicit_name_is_kept(tmp_path: Path) -> None:
    assert load_recipe(write(tmp_path, "name: other\n" + MINIMAL)).name == "other"


def test_name_with_a_slash_is_rejected(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("name=a/b",))
    assert "`name`" in error.problem and "no slashes" in error.problem


def test_defaults_are_the_published_ones(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert (recipe.method.name, recipe.method.rank, recipe.method.alpha) == ("gainlora", 8, 32.0)
    assert (recipe.method.threshold, recipe.method.gate.hidden, recipe.method.nlora.lambda_l1) == (0.995, 100, 0.4)
    assert (recipe.train.lr, recipe.train.global_batch, recipe.train.seed) == (3.0e-4, 32, 42)
    assert (recipe.data.max_source_length, recipe.data.max_target_length) == (512, 50)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_validates(path: Path) -> None:
    assert isinstance(load_recipe(path), Recipe)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_top_level_key_names_line_and_suggestion(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "trian:\n  lr: 0.1\n"))
    assert error.problem == f"{tmp_path / 'run.yaml'} line 6: unknown key `trian`"
    assert error.fix == "did you mean `train`?"


def test_unknown_nested_key_names_dotted_key_line_and_suggestion(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "train:\n  epochs: 2\n  lrr: 0.1\n"))
    assert "line 8: unknown key `train.lrr`" in error.problem
    assert error.fix == "did you mean `train.lr`?"


def test_unknown_key_from_override_says_it_came_from_the_override(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("method.gate.hiden=3",))
    assert error.problem == "override `method.gate.hiden=3`: unknown key `method.gate.hiden`"
    assert error.fix == "did you mean `method.gate.hidden`?"


def test_unknown_key_unlike_any_lists_the_valid_keys(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "output:\n  zzz: 1\n"))
    assert error.fix == "valid keys in `output`: dir"


def test_wrong_type_names_key_expected_given_and_line(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "train:\n  epochs: three\n"))
    assert error.problem == f'{tmp_path / "run.yaml"} line 7: `train.epochs`: expected an integer, got "three" (str)'


def test_out_of_range_value_names_the_bound(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("method.rank=0",))
    assert error.problem == "override `method.rank=0`: `method.rank`: expected a number > 0, got 0 (int)"


def test_unknown_choice_lists_the_choices(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "method:\n  name: lora\n"))
    assert "`method.name`: expected one of 'gainlora', 'inflora'" in error.problem
    assert 'got "lora" (str)' in error.problem


def test_unknown_order_is_refused_when_the_recipe_loads(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("data.order=superni_ordr1",))
    assert "override `data.order=superni_ordr1`: `data.order`: expected a named order" in error.problem
    assert "superni_order1" in error.problem


def test_unknown_builtin_model_is_refused_when_the_recipe_loads(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("model.path=builtin:tiny-lama",))
    assert "`model.path`: expected a built-in model" in error.problem
    assert "builtin:tiny-llama" in error.problem


def test_several_mistakes_are_reported_together(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "train:\n  epochs: x\n  lrr: 1\n"))
    assert error.problem.startswith("2 problems in the recipe:")
    assert "`train.epochs`" in error.problem and "`train.lrr`" in error.problem


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "model:\n  dtype: fp32\ndata:\n  order: o\n"))
    assert "line 1: required key `model.path` is missing" in error.problem


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "model:\n  path: x\n data: 1\n"))
    assert error.problem.startswith(f"{tmp_path / 'run.yaml'} line 3, column 2: malformed YAML")


def test_key_set_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "model:\n  path: y\n"))
    assert "line 6: key `model` is set twice (first on line 1)" in error.problem


def test_recipe_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, "- a\n- b\n"))
    assert "must be a mapping" in error.problem


def test_missing_file_names_the_path_and_a_hint(tmp_path: Path) -> None:
    error = error_of(tmp_path / "nope.yaml")
    assert error.problem == f"recipe `{tmp_path / 'nope.yaml'}` not found"
    assert "recipes/demo.yaml" in error.fix


def test_both_order_and_tasks_is_refused(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("data.tasks=[a]",))
    assert "`data`: expected exactly one of `data.order`" in error.problem


def test_neither_order_nor_tasks_is_refused(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("data.order=null",))
    assert "exactly one of `data.order`" in error.problem


def test_tasks_alone_are_accepted(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ("data.order=null", "data.tasks=[a, b]"))
    assert recipe.data.tasks == ["a", "b"]


def test_custom_template_without_input_is_refused(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL + "  template: 'Q: {question}'\n"))
    assert "line 6: `data.template`: expected auto, superni, long, or a custom template containing {input}" in (
        error.problem
    )


def test_custom_template_with_input_is_accepted(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL + "  template: '{definition} Q: {input} A:'\n"))
    assert recipe.data.template == "{definition} Q: {input} A:"


def test_eval_stages_must_be_one_based(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("eval.stages=[0, 2]",))
    assert "1-based stage numbers" in error.problem


def test_eval_metric_per_task_accepts_rouge_and_exact(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ("eval.metric={a: rouge, b: exact}",))
    assert recipe.eval.metric == {"a": "rouge", "b": "exact"}


def test_eval_metric_per_task_rejects_other_metrics(tmp_path: Path) -> None:
    error = error_of(write(tmp_path, MINIMAL), ("eval.metric={a: bleu}",))
    assert "rouge or exact for every task (got a: 'bleu')" in error.problem


# --- writing, comparing, resolving ---------------------------------------------------------------


def test_resolved_yaml_loads_back_to_an_equal_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        ("train.lr=1e-5", "eval.stages=[1, 3]", "train.epochs_per_task={a: 2}", "deepspeed.overrides={x: {y: 1}}"),
    )
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
    assert again == recipe


def test_resolved_yaml_keeps_float_looking_strings_as_strings(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ("model.attn_implementation='1e3'",))
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
    assert again.model.attn_implementation == "1e3"


def test_recipe_to_dict_fills_every_default(tmp_path: Path) -> None:
    data = recipe_to_dict(load_recipe(write(tmp_path, MINIMAL)))
    assert data["method"]["gate"] == {"hidden": 100, "restore_row_norm": False}


def test_diff_of_identical_recipes_is_empty() -> None:
    assert diff_recipes({"train": {"lr": 0.1}}, {"train": {"lr": 0.1}}) == []


def test_diff_lists_changed_leaves_with_dotted_keys() -> None:
    old = {"train": {"lr": 0.0003, "epochs": 1}, "name": "a"}
    new = {"train": {"lr": 0.0001, "epochs": 1}, "name": "a"}
    assert diff_recipes(old, new) == ["train.lr: 0.0003 -> 0.0001"]


def test_diff_marks_added_and_removed_keys() -> None:
    old = {"train": {"epochs_per_task": {"a": 2}}}
    new = {"train": {"epochs_per_task": {"b": 3}}}
    assert diff_recipes(old, new) == [
        "train.epochs_per_task.a: 2 -> (absent)",
        "train.epochs_per_task.b: (absent) -> 3",
    ]


def test_deepspeed_config_is_found_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert DeepSpeedConfig(config="mine.json").config_path() == Path("mine.json")


def test_deepspeed_config_falls_back_to_the_shipped_ds_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert DeepSpeedConfig(config="ds_configs/zero2.json").config_path() == REPO / "ds_configs" / "zero2.json"


def test_missing_deepspeed_config_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLScaleError, match="DeepSpeed config `nope.json` not found"):
        DeepSpeedConfig(config="nope.json").config_path()


def test_epochs_for_a_task_prefers_its_own_entry(tmp_path: Path) -> None:
    train = load_recipe(write(tmp_path, MINIMAL), ("train.epochs=2", "train.epochs_per_task={sort: 5}")).train
    assert (train.epochs_for("sort"), train.epochs_for("first")) == (5, 2)


@pytest.mark.parametrize(
    ("stages", "expected"), [("all", {0, 1, 2}), ("final", {2}), ("none", set()), ("[1, 3, 7]", {0, 2})]
)
def test_evaluated_stages_are_zero_based_and_within_the_order(tmp_path: Path, stages: str, expected: set[int]) -> None:
    assert load_recipe(write(tmp_path, MINIMAL), (f"eval.stages={stages}",)).eval.evaluated_stages(3) == expected
