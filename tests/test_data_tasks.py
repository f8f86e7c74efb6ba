import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cl_scale.data.tasks import SYNTHETIC_ROOT, check_tasks, load_task, task_info
from cl_scale.errors import CLScaleError


def data_cfg(root: str, **changes: object) -> SimpleNamespace:
    fields = {
        "root": root, "order": None, "tasks": None, "template": "auto", "max_source_length": 64,
        "max_target_length": 8, "max_train_examples": None, "max_eval_examples": None,
    }
    return SimpleNamespace(**{**fields, **changes})


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    for benchmark, task in (("SuperNI", "task1_x"), ("Long_Sequence", "cb")):
        for split in ("train", "test"):
            path = tmp_path / benchmark / task / f"{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            instances = [{"input": f"in {i}", "output": f"out {i}"} for i in range(10)]
            path.write_text(json.dumps({"Definition": ["Do it."], "Instances": instances}))
    return tmp_path


def test_synthetic_root_loads_the_builtin_suite_with_prompts() -> None:
    ds = load_task(data_cfg(SYNTHETIC_ROOT), "reverse", "test", seed=0)
    row = ds[0]
    assert row["prompt"] == f"Reverse the list.\n{row['input']}\nOutput: "


def test_synthetic_caps_are_the_generated_sizes() -> None:
    cfg = data_cfg(SYNTHETIC_ROOT, max_train_examples=30, max_eval_examples=6)
    assert (len(load_task(cfg, "sort", "train", seed=0)), len(load_task(cfg, "sort", "dev", seed=0))) == (30, 6)


def test_train_split_is_capped_by_max_train_examples(bench: Path) -> None:
    cfg = data_cfg(str(bench), max_train_examples=3, max_eval_examples=5)
    assert len(load_task(cfg, "cb", "train", seed=0)) == 3


def test_eval_split_is_capped_by_max_eval_examples(bench: Path) -> None:
    cfg = data_cfg(str(bench), max_train_examples=3, max_eval_examples=5)
    assert len(load_task(cfg, "cb", "test", seed=0)) == 5


def test_auto_template_gives_superni_prompts_for_superni_tasks(bench: Path) -> None:
    prompt = load_task(data_cfg(str(bench)), "task1_x", "train", seed=0)["prompt"][0]
    assert prompt == "Definition: Do it.\n\nNow complete the following example -\nInput: in 0\nOutput: "


def test_auto_template_gives_long_prompts_for_long_sequence_tasks(bench: Path) -> None:
    assert load_task(data_cfg(str(bench)), "cb", "train", seed=0)["prompt"][0] == "Do it.\nin 0\nOutput: "


def test_custom_template_is_applied(bench: Path) -> None:
    cfg = data_cfg(str(bench), template="Q: {input} A:")
    assert load_task(cfg, "cb", "train", seed=0)["prompt"][0] == "Q: in 0 A:"


def test_unknown_synthetic_task_is_an_error() -> None:
    with pytest.raises(CLScaleError, match="unknown synthetic task 'sorted'"):
        task_info(data_cfg(SYNTHETIC_ROOT), "sorted")


def test_task_info_names_the_benchmark_of_a_folder_task(bench: Path) -> None:
    assert task_info(data_cfg(str(bench)), "task1_x").benchmark == "SuperNI"


def test_check_tasks_names_a_missing_split_file_before_training(bench: Path) -> None:
    (next(bench.glob("*/*/test.json"))).unlink()
    task = next(bench.glob("*/*/train.json")).parent.name
    with pytest.raises(CLScaleError, match=rf"{task}/test\.json is missing"):
        check_tasks(data_cfg(str(bench)), [task])


def test_check_tasks_rejects_an_unknown_task(bench: Path) -> None:
    with pytest.raises(CLScaleError, match="nope"):
        check_tasks(data_cfg(str(bench)), ["nope"])


def test_check_tasks_accepts_the_builtin_suite() -> None:
    check_tasks(data_cfg(SYNTHETIC_ROOT), ["first", "sort"])
