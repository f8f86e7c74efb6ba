"""`model.init_adapter`: the first task starts from a PEFT LoRA adapter, computing what PEFT computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_scale.continual_state import build_state, stage_generator
from cl_scale.errors import CLScaleError
from cl_scale.init_adapter import start_from_adapter
from cl_scale.recipe import load_recipe
from tests.export_helpers import plain_model
from tests.trainer_helpers import launch, stage_tensors, write_recipe

RANK = 4
PEFT_ALPHA = 12.0
ALPHA = 8.0


def _adapter(base_dir: Path, out: Path, kind: str, targets: list[str], rank: int = RANK) -> Path:
    """A PEFT adapter with random A and B (init_lora_weights=False), so it changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    task_type = "SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM"
    config = LoraConfig(r=rank, lora_alpha=PEFT_ALPHA, target_modules=targets, init_lora_weights=False,
                        task_type=task_type)
    get_peft_model(plain_model(base_dir, kind), config).save_pretrained(str(out))
    return out


def _recipe(tmp_path: Path, model_dir: Path, adapter: Path, method: dict, **model: object):
    path = write_recipe(
        tmp_path / "r.yaml", model_dir, model={"init_adapter": str(adapter), **model},
        method={"rank": RANK, "alpha": ALPHA, "gate": {"hidden": 16}, **method},
    )
    return load_recipe(path)


def _started(recipe) -> object:
    """The recipe's model at the start of the first task, branch 0 taken from the adapter."""
    state = build_state(recipe, None, 2)
    state.method.grow(0, stage_generator(recipe, 0))
    start_from_adapter(state.model, recipe, state.method.trainable_parameters(0))
    return state.model.eval()


def _inputs(vocab: int, seq2seq: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (2, 10), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(4, vocab, (2, 4), generator=generator)
    return inputs


@pytest.mark.parametrize(("model_name", "kind", "targets"), [("llama", "causal", ["q_proj", "v_proj"]),
                                                              ("t5", "seq2seq", ["q", "v"])])
@pytest.mark.parametrize("method", ["inclora", "seqlora"])
def test_started_model_gives_pefts_logits(tmp_path, tiny_llama_dir, tiny_t5_dir, model_name, kind, targets,
                                          method) -> None:
    from peft import PeftModel

    base_dir = {"llama": tiny_llama_dir, "t5": tiny_t5_dir}[model_name]
    adapter = _adapter(base_dir, tmp_path / "adapter", kind, targets)
    model = _started(_recipe(tmp_path, base_dir, adapter, {"name": method}))
    inputs = _inputs(model.config.vocab_size, kind == "seq2seq")
    extra = {k: v for k, v in inputs.items() if k == "decoder_input_ids"}
    with torch.no_grad():
        ours = model(inputs["input_ids"], inputs["attention_mask"], inputs["attention_mask"], **extra).logits
        peft_model = PeftModel.from_pretrained(plain_model(base_dir, kind), str(adapter)).eval()
        theirs = peft_model(**inputs).logits
        plain = plain_model(base_dir, kind)(**inputs).logits
    assert (plain - theirs).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_an_adapter_of_another_rank_is_refused(tmp_path, tiny_llama_dir) -> None:
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter", "causal", ["q_proj", "v_proj"], rank=8)
    with pytest.raises(CLScaleError, match="rank 8") as err:
        _started(_recipe(tmp_path, tiny_llama_dir, adapter, {"name": "inclora"}))
    assert "method.rank: 8" in err.value.fix


def test_an_adapter_on_other_layers_is_refused_naming_its_targets(tmp_path, tiny_llama_dir) -> None:
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter", "causal", ["k_proj"])
    with pytest.raises(CLScaleError, match="does not cover") as err:
        _started(_recipe(tmp_path, tiny_llama_dir, adapter, {"name": "inclora"}))
    assert "k_proj" in err.value.fix


def test_a_method_that_designs_a_is_refused(tmp_path, tiny_llama_dir) -> None:
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter", "causal", ["q_proj", "v_proj"])
    with pytest.raises(CLScaleError, match="designs A"):
        _started(_recipe(tmp_path, tiny_llama_dir, adapter, {"name": "inflora"}))


def test_a_folder_without_an_adapter_is_refused(tmp_path, tiny_llama_dir) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLScaleError, match="not a PEFT adapter folder"):
        _started(_recipe(tmp_path, tiny_llama_dir, tmp_path / "empty", {"name": "inclora"}))


def test_training_starts_from_the_adapter(tmp_path, tiny_llama_dir) -> None:
    """Through the trainer: after one task at a tiny learning rate, branch 0 is still the adapter's."""
    adapter = _adapter(tiny_llama_dir, tmp_path / "adapter", "causal", ["q_proj", "v_proj"])
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_llama_dir, model={"init_adapter": str(adapter)},
        method={"name": "inclora", "rank": RANK, "alpha": ALPHA},
        data={"root": "builtin:synthetic", "tasks": ["reverse"], "max_train_examples": 8, "max_eval_examples": 2},
        train={"epochs": 1, "per_device_batch": 4, "global_batch": 8, "lr": 1e-7},
    )
    launch([(recipe, tmp_path / "run")], ranks=1, cache=tmp_path / "cache")
    snapshot = stage_tensors(tmp_path / "run", "01-reverse")
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    path = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(snapshot[f"{path}.lora_A_0"], peft[f"base_model.model.{path}.lora_A.weight"],
                               rtol=0, atol=1e-5)
    b_expected = peft[f"base_model.model.{path}.lora_B.weight"] * (PEFT_ALPHA / RANK) / (ALPHA / RANK)
    torch.testing.assert_close(snapshot[f"{path}.lora_B_0"], b_expected, rtol=0, atol=1e-5)
