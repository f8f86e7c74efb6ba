import json
from pathlib import Path

import pytest

from cl_scale.data.benchmark import SPLITS, TaskInfo, default_metric, find_task, list_tasks, load_examples
from cl_scale.data.examples import EXAMPLE_FEATURES
from cl_scale.errors import CLScaleError

KNOWN_GAPS = [
    ("dbpedia", "train"), ("imdb", "dev"), ("imdb", "test"), ("multirc", "dev"), ("multirc", "test"),
    ("yahoo", "train"), ("yahoo", "dev"), ("yahoo", "test"), ("yelp", "dev"), ("yelp", "test"),
]


def write_split(root: Path, task: str, split: str, payload: object, benchmark: str = "SuperNI") -> Path:
    path = root / benchmark / task / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload), encoding="utf-8")
    return path


def superni(n: int, refs: int = 1, definitions: tuple[str, ...] = ("Do it.",)) -> dict:
    return {
        "Definition": list(definitions),
        "Instances": [
            {"id": f"t-{i}", "input": f"in {i}", "output": [f"out {i}.{r}" for r in range(refs)]} for i in range(n)
        ],
    }


def test_missing_root_names_it_and_where_the_data_comes_from(tmp_path: Path) -> None:
    with pytest.raises(CLScaleError) as err:
        find_task(tmp_path / "nowhere", "cb")
    assert str(tmp_path / "nowhere") in err.value.problem
    assert "O-LoRA / GainLoRA" in err.value.fix


def test_unknown_task_suggests_and_lists_known_tasks(tmp_path: Path) -> None:
    write_split(tmp_path, "task363_sst2", "train", superni(1))
    write_split(tmp_path, "task875_emotion", "train", superni(1))
    with pytest.raises(CLScaleError) as err:
        find_task(tmp_path, "task363_sst")
    assert "did you mean 'task363_sst2'" in err.value.problem
    assert "task363_sst2" in err.value.fix and "task875_emotion" in err.value.fix


def test_missing_split_names_the_file(cl_benchmark: Path) -> None:
    with pytest.raises(CLScaleError) as err:
        load_examples(cl_benchmark, "dbpedia", "train")
    assert str(cl_benchmark / "Long_Sequence" / "dbpedia" / "train.json") in err.value.problem
    assert "known gaps" in err.value.fix


@pytest.mark.parametrize(("task", "split"), KNOWN_GAPS)
def test_every_known_gap_raises_naming_its_file(cl_benchmark: Path, task: str, split: str) -> None:
    with pytest.raises(CLScaleError, match=f"{task}/{split}.json is missing"):
        load_examples(cl_benchmark, task, split)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    path = write_split(tmp_path, "t", "train", {"Definition": ["d"], "Instances": []})
    with pytest.raises(CLScaleError, match=f"{path} holds no instances"):
        load_examples(tmp_path, "t", "train")


def test_malformed_json_reports_file_line_and_column(tmp_path: Path) -> None:
    text = '{\n  "Definition": ["d"],\n  "Instances": [\n    {"input": "a", "output": "b",}\n  ]\n}\n'
    path = write_split(tmp_path, "t", "train", text)
    with pytest.raises(CLScaleError) as err:
        load_examples(tmp_path, "t", "train")
    assert str(path) in err.value.problem
    assert "line 4, column 34" in err.value.problem


def test_instance_without_string_output_is_an_error(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", {"Definition": [], "Instances": [{"input": "a", "output": 3}]})
    with pytest.raises(CLScaleError, match="instance 0"):
        load_examples(tmp_path, "t", "train")


def test_unknown_split_is_an_error(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(1))
    with pytest.raises(CLScaleError, match="unknown split 'validation'"):
        load_examples(tmp_path, "t", "validation")


def test_examples_have_the_shared_schema(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(3))
    assert load_examples(tmp_path, "t", "train").features == EXAMPLE_FEATURES


def test_definition_is_the_first_one(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(2, definitions=("first", "second")))
    assert load_examples(tmp_path, "t", "train")["definition"][:] == ["first", "first"]


def test_missing_definition_becomes_empty(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", {"Definition": [], "Instances": [{"input": "a", "output": "b"}]})
    assert load_examples(tmp_path, "t", "train")["definition"][0] == ""


def test_file_ids_are_kept(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(2))
    assert load_examples(tmp_path, "t", "train")["id"][:] == ["t-0", "t-1"]


def test_instances_without_ids_get_task_split_index_ids(tmp_path: Path) -> None:
    instances = [{"input": "a", "output": "x"}, {"input": "b", "output": "y"}]
    write_split(tmp_path, "cb", "dev", {"Definition": ["d"], "Instances": instances}, benchmark="Long_Sequence")
    assert load_examples(tmp_path, "cb", "dev")["id"][:] == ["cb-dev-0", "cb-dev-1"]


def test_string_output_is_a_single_reference(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", {"Definition": ["d"], "Instances": [{"input": "a", "output": "yes"}]})
    row = load_examples(tmp_path, "t", "train")[0]
    assert (row["references"], row["target"]) == (["yes"], "yes")


def test_all_references_are_kept_and_target_is_one_of_them(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(20, refs=4))
    for row in load_examples(tmp_path, "t", "train"):
        assert len(row["references"]) == 4
        assert row["target"] in row["references"]


def test_target_choice_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(50, refs=5))
    first = load_examples(tmp_path, "t", "train", seed=3)["target"][:]
    assert load_examples(tmp_path, "t", "train", seed=3)["target"][:] == first


def test_target_choice_changes_with_the_seed(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(50, refs=5))
    one = load_examples(tmp_path, "t", "train", seed=0)["target"][:]
    assert load_examples(tmp_path, "t", "train", seed=1)["target"][:] != one


def test_target_choice_does_not_depend_on_the_subset(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(50, refs=5))
    full = load_examples(tmp_path, "t", "train")
    by_id = dict(zip(full["id"], full["target"]))
    subset = load_examples(tmp_path, "t", "train", max_examples=10)
    assert all(by_id[i] == t for i, t in zip(subset["id"], subset["target"]))


def test_max_examples_takes_a_seeded_subset_in_file_order(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(100))
    ids = load_examples(tmp_path, "t", "train", max_examples=10, seed=5)["id"][:]
    assert len(ids) == 10
    assert ids == sorted(ids, key=lambda i: int(i.split("-")[1]))
    assert load_examples(tmp_path, "t", "train", max_examples=10, seed=5)["id"][:] == ids


def test_max_examples_subset_changes_with_the_seed(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(100))
    one = load_examples(tmp_path, "t", "train", max_examples=10, seed=0)["id"][:]
    assert load_examples(tmp_path, "t", "train", max_examples=10, seed=1)["id"][:] != one


def test_non_positive_max_examples_is_an_error(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(5))
    with pytest.raises(CLScaleError, match="max examples is 0"):
        load_examples(tmp_path, "t", "train", max_examples=0)


def test_max_examples_above_the_split_size_keeps_everything(tmp_path: Path) -> None:
    write_split(tmp_path, "t", "train", superni(5))
    assert len(load_examples(tmp_path, "t", "train", max_examples=50)) == 5


@pytest.mark.parametrize(
    ("benchmark", "metric"), [("SuperNI", "rouge"), ("Long_Sequence", "exact"), ("Synthetic", "exact")]
)
def test_default_metric_follows_the_benchmark(benchmark: str, metric: str) -> None:
    assert default_metric(TaskInfo("t", benchmark, None)) == metric


def test_real_benchmark_has_30_tasks_in_two_benchmarks(cl_benchmark: Path) -> None:
    infos = list_tasks(cl_benchmark)
    assert len(infos) == 30
    assert {info.benchmark for info in infos} == {"SuperNI", "Long_Sequence"}


def test_every_present_split_of_the_real_benchmark_loads(cl_benchmark: Path) -> None:
    loaded = 0
    for info in list_tasks(cl_benchmark):
        for split in SPLITS:
            if (info.path / f"{split}.json").is_file():
                ds = load_examples(cl_benchmark, info.name, split)
                assert len(ds) > 0 and ds.features == EXAMPLE_FEATURES
                assert all(t in r for t, r in zip(ds["target"][:], ds["references"][:]))
                assert len(set(ds["id"][:])) == len(ds)
                loaded += 1
    assert loaded == 30 * 3 - len(KNOWN_GAPS)
