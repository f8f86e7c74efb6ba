"""Today's model families through the training path: tiny configs built from `plan`'s table of public
shapes (Llama-3.1, Qwen2.5, Mistral, Gemma-2, Phi-3) with only the sizes shrunk, trained for two tasks,
the default target modules each family gets, Gemma's scaled embedding as the gate input, and Qwen2 on
2 ZeRO-3 ranks equal to 1 rank."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_scale.plan import PUBLIC_MODELS
from tests.trainer_helpers import launch, train_log, train_runs, write_recipe

FAMILIES = {
    "llama3": "meta-llama/Llama-3.1-8B",
    "qwen2": "Qwen/Qwen2.5-7B",
    "mistral": "mistralai/Mistral-7B-v0.3",
    "gemma2": "google/gemma-2-9b",
    "phi3": "microsoft/Phi-3-mini-4k-instruct",
}
STAGES = ["01-reverse", "02-sort"]


def tiny_config(public: str, vocab: int):
    """The public model's config with its family extras kept and only the sizes shrunk; token ids are
    the test tokenizer's (unk 0, bos 1, eos 2, pad 3)."""
    facts = PUBLIC_MODELS[public]
    extra = {**dict(facts.extra), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if "head_dim" in extra:
        extra["head_dim"] = 32  # still wider than hidden / heads (16), as Gemma-2's 256 vs 3584 / 16 = 224
    tiny = replace(facts, hidden=64, layers=2, heads=4, kv_heads=2 if facts.kv_heads < facts.heads else 4,
                   intermediate=128, vocab=vocab, extra=tuple(extra.items()))
    return tiny.config()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, llama_tokenizer_dir: Path) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from cl_scale.builtin.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, public in FAMILIES.items():
        out = root / name
        shutil.copytree(llama_tokenizer_dir, out)
        vocab = len(AutoTokenizer.from_pretrained(out))
        build_tiny_model(tiny_config(public, vocab), seed=0).save_pretrained(out)
        dirs[name] = out
    return dirs


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory: pytest.TempPathFactory, family_dirs: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    """Every family trained on two synthetic tasks with GainLoRA, one launch: (recipe, run) by family."""
    root = tmp_path_factory.mktemp("family_runs")
    recipes = {}
    for name, model in family_dirs.items():
        # Gemma-2's attention soft-capping has no sdpa kernel in transformers: eager, as its recipe says.
        attention = {"attn_implementation": "eager"} if name == "gemma2" else {}
        recipes[name] = write_recipe(root / f"{name}.yaml", model, model=attention,
                                     train={"epochs": 1, "per_device_batch": 4, "global_batch": 8})
    runs = train_runs(root, recipes)
    return {name: (recipes[name], runs[name]) for name in recipes}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_two_tasks_with_finite_losses(family_runs, family: str) -> None:
    for stage in STAGES:
        losses = [row["loss"] for row in train_log(family_runs[family][1], stage)]
        assert losses and all(math.isfinite(x) for x in losses), (family, stage)


@pytest.mark.parametrize(("family", "targets"), [
    ("llama3", {"q_proj", "v_proj"}), ("qwen2", {"q_proj", "v_proj"}), ("mistral", {"q_proj", "v_proj"}),
    ("gemma2", {"q_proj", "v_proj"}), ("phi3", {"qkv_proj"}),
])
def test_family_gets_its_default_target_modules(family_runs, family: str, targets: set[str]) -> None:
    snapshot = load_file(str(family_runs[family][1] / "stages" / STAGES[-1] / "snapshot.safetensors"))
    branched = {part for key in snapshot for part in key.split(".") if part.endswith("proj")}
    assert branched == targets


def test_gemma2_gate_reads_the_embedding_scaled_by_sqrt_hidden(family_dirs) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(family_dirs["gemma2"], dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7]])
    lookup = base.get_input_embeddings()(ids)  # what ContinualModel.gate_input averages
    assert torch.allclose(lookup, base.get_input_embeddings().weight[ids] * math.sqrt(64))


def test_qwen2_tiny_config_keeps_the_qkv_biases(family_dirs) -> None:
    from transformers import AutoModelForCausalLM

    attention = AutoModelForCausalLM.from_pretrained(family_dirs["qwen2"]).model.layers[0].self_attn
    assert [p.bias is not None for p in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)] == [
        True, True, True, False
    ]


@pytest.mark.multirank
def test_qwen2_two_zero3_ranks_reproduce_one_rank(tmp_path: Path, family_runs) -> None:
    recipe, one_rank = family_runs["qwen2"]
    runs = {1: one_rank, 2: tmp_path / "run-2"}
    launch([(recipe, runs[2])], ranks=2, cache=tmp_path / "cache")
    for stage in STAGES:
        one, two = train_log(runs[1], stage), train_log(runs[2], stage)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7), (stage, a["step"])
        first = load_file(str(runs[1] / "stages" / stage / "snapshot.safetensors"))
        second = load_file(str(runs[2] / "stages" / stage / "snapshot.safetensors"))
        assert first.keys() == second.keys() and first
        for name in first:
            torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=1e-5, msg=f"{stage} {name}")
