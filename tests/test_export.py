"""`cl-scale export` on tiny real runs: PEFT adapters and merged weights against cl-scale's stage model,
the gated package against `cl-scale generate`, the notebook loader, and every refusal.

One launch (world of one) trains IncLoRA and SeqLoRA on a tiny Llama, IncLoRA on a tiny T5 and GainLoRA.
"""

from __future__ import annotations

import doctest
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

import cl_scale
from cl_scale import local_stage
from cl_scale.cli import app
from cl_scale.errors import CLScaleError
from cl_scale.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, GATED_CONFIG, export_run
from cl_scale.local_stage import load_run
from cl_scale.modeling.loading import model_dir
from tests.export_helpers import peft_logits, plain_model, sample_inputs, stage_logits
from tests.trainer_helpers import train_runs, write_recipe

runner = CliRunner()
TASKS = ["reverse", "sort"]
RUNS = {
    "inclora": ("llama", {"name": "inclora"}),
    "seqlora": ("llama", {"name": "seqlora"}),
    "inclora_t5": ("t5", {"name": "inclora"}),
    "gainlora": ("llama", {"name": "gainlora"}),
}
RANK = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_t5_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    models = {"llama": tiny_llama_dir, "t5": tiny_t5_dir}
    recipes = {
        name: write_recipe(
            root / f"{name}.yaml", models[model], method={"rank": RANK, "alpha": 8.0, "gate": {"hidden": 16}, **method},
            data={"root": "builtin:synthetic", "tasks": TASKS, "max_train_examples": 16, "max_eval_examples": 4},
            train={"epochs": 2, "per_device_batch": 4, "global_batch": 8, "lr": 2e-2},
        )
        for name, (model, method) in RUNS.items()
    }
    return train_runs(root, recipes)


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _cli(args: list[str], run: Path) -> Result:
    """`cl-scale ARGS` in this process as a world of one, with the training run's data cache."""
    env = {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(),
        "CL_SCALE_CACHE": str(run.parent / "cache"), "COLUMNS": "200",
    }
    return runner.invoke(app, args, env=env)


def _assert_branches_matter(stage, inputs, expected) -> None:
    """The stage model differs from its base, so a wrong scaling or a missing branch would show."""
    base = plain_model(model_dir(stage.recipe.model), stage.kind)
    with torch.no_grad():
        plain = base(**inputs).logits.float()
    assert (plain - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["inclora", "inclora_t5"])
def test_peft_adapter_gives_the_stage_models_logits(runs, tmp_path, name) -> None:
    out = tmp_path / "peft"
    export_run(runs[name], out, fmt="peft")
    stage = load_run(runs[name])
    inputs = sample_inputs(stage)
    expected = stage_logits(stage, inputs)
    _assert_branches_matter(stage, inputs, expected)
    got = peft_logits(model_dir(stage.recipe.model), [out], stage.kind, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_peft_adapter_of_stage_k_has_rank_k_r_and_alpha_s_k_r(runs, tmp_path) -> None:
    out = tmp_path / "peft"
    export_run(runs["inclora"], out, fmt="peft", stage=2)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"]) == (2 * RANK, (8.0 / RANK) * 2 * RANK)
    assert config["base_model_name_or_path"] == model_dir(load_run(runs["inclora"]).recipe.model)


@pytest.mark.parametrize(("name", "stage"), [("inclora", 1), ("seqlora", None)], ids=["inclora_stage_1", "seqlora"])
def test_a_one_branch_stage_exports_one_adapter_of_rank_r_with_its_logits(runs, tmp_path, name, stage) -> None:
    """IncLoRA's first stage holds one branch and SeqLoRA always does: one adapter of rank r either way."""
    out = tmp_path / "peft"
    export_run(runs[name], out, fmt="peft", stage=stage)
    loaded = load_run(runs[name], stage=stage)
    inputs = sample_inputs(loaded)
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == RANK
    got = peft_logits(model_dir(loaded.recipe.model), [out], loaded.kind, inputs)
    torch.testing.assert_close(got, stage_logits(loaded, inputs), rtol=0, atol=1e-5)


def test_per_task_adapters_active_together_give_the_stage_models_logits(runs, tmp_path) -> None:
    out = tmp_path / "per_task"
    export_run(runs["inclora"], out, fmt="peft", per_task=True)
    adapters = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in adapters] == ["01-reverse", "02-sort"]
    assert [json.loads((p / ADAPTER_CONFIG).read_text())["r"] for p in adapters] == [RANK, RANK]
    stage = load_run(runs["inclora"])
    inputs = sample_inputs(stage)
    got = peft_logits(model_dir(stage.recipe.model), adapters, stage.kind, inputs)
    torch.testing.assert_close(got, stage_logits(stage, inputs), rtol=0, atol=1e-5)


def test_per_task_adapter_holds_that_tasks_snapshot_branch(runs, tmp_path) -> None:
    out = tmp_path / "per_task"
    export_run(runs["inclora"], out, fmt="peft", per_task=True)
    snapshot = load_file(str(runs["inclora"] / "stages" / "02-sort" / "snapshot.safetensors"))
    tensors = load_file(str(out / "02-sort" / ADAPTER_WEIGHTS))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(tensors[name], snapshot["model.layers.0.self_attn.q_proj.lora_B_1"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["inclora", "inclora_t5"])
def test_merged_checkpoint_loads_with_plain_transformers_and_gives_the_stage_models_logits(
    runs, tmp_path, name
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    export_run(runs[name], out, fmt="merged")
    stage = load_run(runs[name])
    inputs = sample_inputs(stage)
    expected = stage_logits(stage, inputs)
    with torch.no_grad():
        got = plain_model(out, stage.kind)(**inputs).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert list(out.glob("*.safetensors")) and AutoTokenizer.from_pretrained(out).pad_token_id == stage.tokenizer.pad_token_id


def test_gated_package_answers_like_cl_scale_generate_without_the_run_dir(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["gainlora"], run)
    (tmp_path / "cache").symlink_to(runs["gainlora"].parent / "cache")
    prompts = ["Reverse the list.\nb f a\nOutput: ", "Sort the list.\nc a d\nOutput: ", "Reverse the list.\nx y\nOutput: "]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    result = _cli(["generate", str(run), "--input", str(inputs)], run)
    assert result.exit_code == 0, result.output
    expected = [json.loads(line) for line in result.stdout.splitlines()]
    stage = load_run(run)
    logits_inputs = sample_inputs(stage)
    expected_logits = stage_logits(stage, logits_inputs)
    out = tmp_path / "gated"
    export_run(run, out, fmt="gated")
    shutil.rmtree(run)
    exported = cl_scale.load_exported(out)
    torch.testing.assert_close(stage_logits(exported, logits_inputs), expected_logits, rtol=0, atol=1e-6)
    assert exported.generate(prompts) == [row["answer"] for row in expected]
    gates = exported.gates(prompts)
    for index, row in enumerate(expected):
        assert {t: gates[t][index] for t in TASKS} == pytest.approx(row["gates"], abs=1e-6)
    assert not torch.distributed.is_initialized()


def test_gated_package_holds_per_task_peft_adapters_and_the_gate_bank(runs, tmp_path) -> None:
    out = tmp_path / "gated"
    export_run(runs["gainlora"], out, fmt="gated")
    config = json.loads((out / GATED_CONFIG).read_text())
    assert config["tasks"] == TASKS
    for adapter in config["adapters"]:
        assert json.loads((out / adapter / ADAPTER_CONFIG).read_text())["r"] == RANK
    gates = load_file(str(out / config["gates"]))
    snapshot = load_file(str(runs["gainlora"] / "stages" / "02-sort" / "snapshot.safetensors"))
    for name, value in gates.items():
        torch.testing.assert_close(value, snapshot[f"gates.{name}"], rtol=0, atol=0)


def test_loaded_run_answers_like_the_trainers_evaluation(runs) -> None:
    run = runs["inclora"]
    rows = [json.loads(x) for x in (run / "stages" / "02-sort" / "predictions" / "sort.jsonl").read_text().splitlines()]
    stage = load_run(run)
    assert stage.generate([r["prompt"] for r in rows]) == [r["prediction"] for r in rows]
    assert not torch.distributed.is_initialized()


def test_notebook_docstring_example_runs(runs) -> None:
    finder = doctest.DocTestFinder()
    test_runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(local_stage, globs={"run_dir": runs["inclora"]}):
        test_runner.run(test)
    results = test_runner.summarize(verbose=False)
    assert results.attempted >= 3 and results.failed == 0


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_peft_for_gainlora_is_refused_with_the_reason_and_gated_as_the_fix(runs, tmp_path) -> None:
    with pytest.raises(CLScaleError) as err:
        export_run(runs["gainlora"], tmp_path / "out", fmt="peft")
    assert "gate" in err.value.problem and "--format gated" in err.value.fix
    _no_leftovers(tmp_path / "out")


def test_gated_for_an_ungated_method_is_refused(runs, tmp_path) -> None:
    with pytest.raises(CLScaleError, match="no gates"):
        export_run(runs["inclora"], tmp_path / "out", fmt="gated")
    _no_leftovers(tmp_path / "out")


def test_a_stage_that_does_not_exist_is_refused(runs, tmp_path) -> None:
    with pytest.raises(CLScaleError, match="stage 3 does not exist"):
        export_run(runs["inclora"], tmp_path / "out", fmt="peft", stage=3)


def test_a_run_without_a_finished_stage_is_refused(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["inclora"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "stages": []}))
    with pytest.raises(CLScaleError, match="no finished stage"):
        export_run(run, tmp_path / "out", fmt="peft")


def test_a_damaged_snapshot_is_refused_and_leaves_nothing(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["inclora"], run)
    snapshot = run / "stages" / "02-sort" / "snapshot.safetensors"
    snapshot.write_bytes(snapshot.read_bytes()[:100])
    with pytest.raises(CLScaleError, match="cannot be read") as err:
        export_run(run, tmp_path / "out", fmt="peft")
    assert "damaged" in err.value.fix
    _no_leftovers(tmp_path / "out")


def test_a_non_empty_destination_is_refused_unless_forced(runs, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CLScaleError, match="not empty"):
        export_run(runs["inclora"], out, fmt="peft")
    assert (out / "keep.txt").is_file()
    export_run(runs["inclora"], out, fmt="peft", force=True)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_exported_files_are_readable_by_everyone(runs, tmp_path) -> None:
    out = tmp_path / "gated"
    export_run(runs["gainlora"], out, fmt="gated")
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes and all(mode in (0o644, 0o755) for mode in modes.values()), modes


def test_a_failure_while_writing_leaves_no_partial_folder(runs, tmp_path, monkeypatch) -> None:
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_run(runs["inclora"], tmp_path / "out", fmt="peft", per_task=True)
    _no_leftovers(tmp_path / "out")


def test_cli_export_prints_the_rank_vllm_needs(runs, tmp_path) -> None:
    out = tmp_path / "out"
    result = _cli(["export", str(runs["inclora"]), "--out", str(out), "--format", "peft"], runs["inclora"])
    assert result.exit_code == 0, result.output
    assert f"--max-lora-rank {2 * RANK}" in result.stdout
    assert (out / ADAPTER_WEIGHTS).is_file()


def test_cli_export_refuses_bad_input_with_one_error(runs, tmp_path) -> None:
    result = _cli(["export", str(runs["gainlora"]), "--out", str(tmp_path / "o"), "--format", "merged"], runs["gainlora"])
    assert result.exit_code == 2
    assert "error:" in result.stderr and "--format gated" in result.stderr


def test_cli_export_help_explains_every_format() -> None:
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert all(word in result.stdout for word in ("peft:", "merged:", "gated:"))


def test_peft_merge_weighted_by_one_prompts_gates_gives_the_gated_models_logits(runs, tmp_path) -> None:
    """The exact way to serve a gated export on an engine (docs/export.md): PEFT's `cat` merge of the task
    adapters weighted by the request's gate coefficients equals the gated model on that request."""
    from peft import PeftModel

    out = tmp_path / "gated"
    export_run(runs["gainlora"], out, fmt="gated")
    config = json.loads((out / GATED_CONFIG).read_text())
    exported = cl_scale.load_exported(out)
    inputs = {k: v[:1] for k, v in sample_inputs(exported).items()}
    with torch.no_grad():
        coefs = exported.model.gates(exported.model.gate_input(inputs["input_ids"], inputs["attention_mask"]))[0]
    assert coefs.min() < 0.99  # the coefficients are not all 1, so the weighting is exercised
    names = [f"t{i}" for i in range(len(config["adapters"]))]
    base = plain_model(model_dir(exported.recipe.model), exported.kind)
    model = PeftModel.from_pretrained(base, str(out / config["adapters"][0]), adapter_name=names[0])
    for name, adapter in zip(names[1:], config["adapters"][1:]):
        model.load_adapter(str(out / adapter), adapter_name=name)
    model.add_weighted_adapter(names, coefs.tolist(), adapter_name="request", combination_type="cat")
    model.set_adapter("request")
    with torch.no_grad():
        got = model(**inputs).logits.float()
    torch.testing.assert_close(got, stage_logits(exported, inputs), rtol=0, atol=1e-5)


def _world_of_one(monkeypatch, run: Path) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": _free_port(), "CL_SCALE_CACHE": str(run.parent / "cache")}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name", ["inclora", "inclora_t5"])
def test_module_by_module_zero3_merge_in_shards_gives_the_stage_models_logits(runs, tmp_path, monkeypatch, name) -> None:
    from cl_scale.export_sharded import WEIGHTS_INDEX, export_merged_sharded

    _world_of_one(monkeypatch, runs[name])
    out = tmp_path / "sharded"
    assert export_merged_sharded(runs[name], out, stage=None, force=False, max_shard_bytes=200_000) == 2
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really written in several shards
    stage = load_run(runs[name])
    inputs = sample_inputs(stage)
    with torch.no_grad():
        got = plain_model(out, stage.kind)(**inputs).logits.float()
    torch.testing.assert_close(got, stage_logits(stage, inputs), rtol=0, atol=1e-5)


def test_module_by_module_merge_writes_what_save_pretrained_writes(runs, tmp_path, monkeypatch) -> None:
    from cl_scale.export_sharded import export_merged_sharded

    _world_of_one(monkeypatch, runs["inclora"])
    export_merged_sharded(runs["inclora"], tmp_path / "sharded", stage=None, force=False, max_shard_bytes=1 << 30)
    export_run(runs["inclora"], tmp_path / "plain", fmt="merged")
    ours = load_file(str(tmp_path / "sharded" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.multirank
def test_two_rank_module_by_module_merge_gives_the_stage_models_logits(runs, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from tests.trainer_helpers import REPO

    out = tmp_path / "sharded"
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", _free_port(), str(bin_dir / "cl-scale"),
        "export", str(runs["inclora"]), "--out", str(out), "--format", "merged", "--shard-mb", "1",
    ]
    env = {**os.environ, "CL_SCALE_CACHE": str(runs["inclora"].parent / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("exported stage 2") == 1  # two ranks ran it, rank 0 reported
    stage = load_run(runs["inclora"])
    inputs = sample_inputs(stage)
    with torch.no_grad():
        got = plain_model(out, stage.kind)(**inputs).logits.float()
    torch.testing.assert_close(got, stage_logits(stage, inputs), rtol=0, atol=1e-5)


def test_peft_under_the_launcher_is_refused_with_the_reason(runs, tmp_path, monkeypatch) -> None:
    from cl_scale.export import export_cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CLScaleError, match="written by one process") as err:
        export_cli(runs["inclora"], tmp_path / "out", stage=None, fmt="peft", per_task=False, force=False, shard_mb=5)
    assert "without the launcher" in err.value.fix
    _no_leftovers(tmp_path / "out")
