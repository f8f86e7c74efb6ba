"""Own tasks in the recipe: every file format read through `datasets`, mixed with benchmark tasks in one
order, and every defect of a file one CLScaleError naming the file (and the record) before a run starts."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from datasets import Dataset, DatasetDict

from cl_scale.data.benchmark import default_metric
from cl_scale.data.orders import resolve_tasks
from cl_scale.data.tasks import check_tasks, load_task, task_info
from cl_scale.errors import CLScaleError
from cl_scale.recipe import TaskFilesConfig, load_recipe

RECORDS = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(6)]


def own(tmp_path: Path, name: str = "mine", **fields: object) -> TaskFilesConfig:
    files = {}
    for split in ("train", "test"):
        path = tmp_path / f"{name}-{split}.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        files[split] = str(path)
    return TaskFilesConfig(**{"name": name, "metric": "exact", **files, **fields})


def data_cfg(tasks: list, root: str = "builtin:synthetic", **changes: object) -> SimpleNamespace:
    fields = {
        "root": root, "order": None, "tasks": tasks, "template": "auto", "max_source_length": 64,
        "max_target_length": 8, "max_train_examples": None, "max_eval_examples": None,
    }
    return SimpleNamespace(**{**fields, **changes})


def load(spec: TaskFilesConfig, split: str = "train", **changes: object):
    return load_task(data_cfg([spec], **changes), spec.name, split, seed=0)


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# -- formats -------------------------------------------------------------------------------------------


def test_jsonl_split_gives_inputs_and_answers_in_file_order(tmp_path: Path) -> None:
    ds = load(own(tmp_path))
    assert (ds["input"], ds["target"]) == ([r["input"] for r in RECORDS], [r["output"] for r in RECORDS])


def test_json_list_of_records_with_other_field_names(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a b", "label": "pos"}, {"text": "c", "label": "neg"}]))
    ds = load(own(tmp_path, train=str(path), input_field="text", output_field="label"))
    assert (ds["input"], ds["references"]) == (["a b", "c"], [["pos"], ["neg"]])


def test_json_in_cl_benchmark_layout_brings_its_definition(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    instances = [{"id": "x1", "input": "in", "output": ["first", "second"]}]
    path.write_text(json.dumps({"Definition": ["Answer it."], "Instances": instances}))
    ds = load(own(tmp_path, train=str(path)))
    assert (ds["id"], ds["references"], ds["prompt"]) == (["x1"], [["first", "second"]], ["Answer it.\nin\nOutput: "])


def test_csv_split_keeps_numeric_and_empty_looking_answers_as_text(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('input,output\n"one, two",1\nthree,None\n')
    ds = load(own(tmp_path, train=str(path)))
    assert (ds["input"], ds["target"]) == (["one, two", "three"], ["1", "None"])


def test_parquet_split(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    Dataset.from_list(RECORDS[:3]).to_parquet(str(path))
    assert load(own(tmp_path, train=str(path)))["target"] == ["answer 0", "answer 1", "answer 2"]


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    Dataset.from_list(RECORDS[:2]).save_to_disk(str(tmp_path / "saved"))
    assert load(own(tmp_path, train=str(tmp_path / "saved")))["input"] == ["question 0", "question 1"]


def test_dataset_dict_saved_to_disk_gives_its_validation_split_as_dev(tmp_path: Path) -> None:
    saved = tmp_path / "dict"
    DatasetDict({"train": Dataset.from_list(RECORDS[:4]), "validation": Dataset.from_list(RECORDS[4:])}).save_to_disk(
        str(saved)
    )
    spec = own(tmp_path, train=str(saved), dev=str(saved))
    assert (len(load(spec, "train")), load(spec, "dev")["input"]) == (4, ["question 4", "question 5"])


def test_instruction_and_task_template_build_the_prompt(tmp_path: Path) -> None:
    spec = own(tmp_path, instruction="Say it back.", template="[{definition}] {input} =>")
    assert load(spec)["prompt"][0] == "[Say it back.] question 0 =>"


def test_max_examples_caps_an_own_split(tmp_path: Path) -> None:
    assert len(load(own(tmp_path), max_train_examples=4)) == 4


def test_own_task_metric_is_the_tasks_own(tmp_path: Path) -> None:
    spec = own(tmp_path, metric="rouge")
    assert default_metric(task_info(data_cfg([spec]), "mine")) == "rouge"


def test_one_order_mixes_own_files_and_cl_benchmark_tasks(tmp_path: Path) -> None:
    for split in ("train", "test"):
        path = tmp_path / "bench" / "Long_Sequence" / "cb" / f"{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"Definition": ["Do it."], "Instances": RECORDS}))
    cfg = data_cfg([own(tmp_path, "a"), "cb", own(tmp_path, "b")], root=str(tmp_path / "bench"))
    names = resolve_tasks(None, cfg.tasks)
    sources = [task_info(cfg, name).benchmark for name in names]
    assert (names, sources) == (["a", "cb", "b"], ["own files", "Long_Sequence", "own files"])
    check_tasks(cfg, names)
    assert [load_task(cfg, name, "test", seed=0)["task"][0] for name in names] == names


def test_recipe_reads_own_task_entries(tmp_path: Path) -> None:
    spec = own(tmp_path)
    recipe = tmp_path / "r.yaml"
    entry = {"name": "mine", "train": spec.train, "test": spec.test, "metric": "exact"}
    recipe.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"tasks": ["cb", entry]}}))
    assert load_recipe(recipe).data.tasks == ["cb", spec]


def test_recipe_error_for_an_own_task_names_its_key_and_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: m}\ndata:\n  tasks:\n  - cb\n  - name: mine\n    train: a.jsonl\n    test: b.jsonl\n")
    with pytest.raises(CLScaleError, match=r"line 5: required key `data.tasks.1.metric` is missing"):
        load_recipe(recipe)


def test_recipe_error_for_an_unknown_own_task_key_lists_the_valid_ones(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: m}\ndata:\n  tasks:\n  - name: mine\n    train: a\n    test: b\n"
                      "    metric: exact\n    inputs: text\n")
    with pytest.raises(CLScaleError, match=r"(?s)unknown key `data.tasks.0.inputs`.*valid keys in `data.tasks.0`: name, train, test, dev, input_field"):
        load_recipe(recipe)


# -- bad input -----------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CLScaleError, match=r"task mine: test file .*nope\.jsonl not found"):
        check_tasks(data_cfg([own(tmp_path, test=str(tmp_path / "nope.jsonl"))]), ["mine"])


def test_missing_dev_file_is_named_when_the_task_names_one(tmp_path: Path) -> None:
    with pytest.raises(CLScaleError, match=r"dev file .*dev\.jsonl not found"):
        check_tasks(data_cfg([own(tmp_path, dev=str(tmp_path / "dev.jsonl"))]), ["mine"])


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "input,output\n")])
def test_empty_split_is_named(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(CLScaleError, match=rf"{name} (is empty|holds no records)"):
        load(own(tmp_path, train=str(tmp_path / name)))


def test_record_without_output_names_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "a", "output": "x"}\n\n{"input": "b"}\n')
    with pytest.raises(CLScaleError, match=r"t\.jsonl record 2 \(line 3\) has no `output`"):
        load(own(tmp_path, train=str(path)))


def test_field_absent_from_every_record_lists_the_fields_found(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"question": "a", "output": "x"}]))
    with pytest.raises(CLScaleError, match=r"no record of .*t\.json has the field 'input' \(fields found: question, output\)"):
        load(own(tmp_path, train=str(path)))


def test_input_of_the_wrong_type_names_the_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"input": "a", "output": "x"}, {"input": 7, "output": "y"}])
    with pytest.raises(CLScaleError, match=r"record 2 \(line 2\) has `input` of type int"):
        load(own(tmp_path, train=path))


def test_output_list_with_a_number_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"input": "a", "output": ["x"]}, {"input": "b", "output": ["y", 3]}]))
    with pytest.raises(CLScaleError, match=r"t\.json record 2 has `output` as a list with a non-string"):
        load(own(tmp_path, train=str(path)))


def test_csv_without_header_says_so(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("what is 1+1,2\nwhat is 2+2,4\n")
    with pytest.raises(CLScaleError, match=r"t\.csv has no column 'input', 'output' in its header.*without a header"):
        load(own(tmp_path, train=str(path)))


def test_damaged_jsonl_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "a", "output": "x"}\n{"input": \n')
    with pytest.raises(CLScaleError, match=r"t\.jsonl cannot be read as JSON"):
        load(own(tmp_path, train=str(path)))


def test_unknown_suffix_is_named(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(CLScaleError, match=r"t\.txt has a suffix cl-scale cannot read"):
        load(own(tmp_path, train=str(tmp_path / "t.txt")))


def test_duplicate_task_names_across_sources(tmp_path: Path) -> None:
    with pytest.raises(CLScaleError, match="lists sort more than once"):
        resolve_tasks(None, ["sort", own(tmp_path, "sort")])


# -- before a run --------------------------------------------------------------------------------------


def own_recipe(tmp_path: Path, model_dir: Path, entry: dict) -> object:
    from tests.trainer_helpers import write_recipe

    path = write_recipe(tmp_path / "r.yaml", model_dir, data={"tasks": ["reverse", entry]},
                        output={"dir": str(tmp_path / "runs")})
    return load_recipe(path)


def bad_entry(tmp_path: Path) -> dict:
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*RECORDS, {"input": "q"}])
    return {"name": "mine", "train": good, "test": bad, "metric": "exact"}


def test_bad_own_task_stops_training_before_the_run_directory_exists(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from cl_scale.trainer import run_training

    recipe = own_recipe(tmp_path, tiny_llama_dir, bad_entry(tmp_path))
    with pytest.raises(CLScaleError, match=r"bad\.jsonl record 7 \(line 7\) has no `output`"):
        run_training(recipe, resume=False, run_dir=None, allow_changed_recipe=False)
    assert not (tmp_path / "runs").exists()


def test_plan_reports_a_bad_own_task_as_an_error(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from cl_scale.plan import make_plan

    plan = make_plan(own_recipe(tmp_path, tiny_llama_dir, bad_entry(tmp_path)), gpus=1, nodes=1)
    assert [(c.subject, "bad.jsonl record 7" in c.message) for c in plan.errors] == [("mine", True)]


def test_data_check_lists_own_tasks_with_their_sizes_and_an_absent_dev(tiny_llama_dir: Path, capsys) -> None:
    from cl_scale.data_check import check_recipe_cli

    example = Path(__file__).resolve().parent.parent / "recipes" / "own_tasks_example.yaml"
    check_recipe_cli(load_recipe(example, [f"model.path={tiny_llama_dir}"]))
    rows = [line.split("│") for line in capsys.readouterr().out.splitlines() if "│" in line]
    cells = {(r[1].strip(), r[2].strip()): r[3].strip() for r in rows if len(r) > 4}
    assert (cells[("own files", "count")], cells[("count", "dev")], cells[("first_two", "dev")]) == ("48", "none", "8")


def test_prompt_template_is_the_own_tasks_else_the_recipes(tmp_path: Path) -> None:
    from cl_scale.data.tasks import prompt_template

    cfg = data_cfg([own(tmp_path, "a", template="Q: {input} A:"), own(tmp_path, "b")], template="In: {input}")
    assert (prompt_template(cfg, "a"), prompt_template(cfg, "b")) == ("Q: {input} A:", "In: {input}")
