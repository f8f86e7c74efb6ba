"""Checks shared by the export tests: the logits of an exported model against cl-scale's own stage model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from cl_scale.local_stage import LocalStage


def sample_inputs(stage: LocalStage, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two random token sequences (plus decoder inputs for T5), the second left-padded by three tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocab = stage.model.config.vocab_size
    ids = torch.randint(4, vocab, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if stage.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(4, vocab, (2, 5), generator=generator)
    return inputs


def stage_logits(stage: LocalStage, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """cl-scale's continual model on `inputs` (every token counts as prompt for the gate input)."""
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = stage.model(inputs["input_ids"], inputs["attention_mask"], inputs["attention_mask"], **extra)
    return out.logits.float()


def plain_model(path: Path | str, kind: str) -> torch.nn.Module:
    """A checkpoint loaded by plain transformers in float32."""
    factory = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    return factory.from_pretrained(str(path), dtype=torch.float32).eval()


def peft_logits(base: Path | str, adapters: list[Path], kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's model: the base with `adapters` loaded by PeftModel and all of them active at once."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(plain_model(base, kind), str(adapters[0]), adapter_name="a0")
    for index, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(str(adapter), adapter_name=f"a{index}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    with torch.no_grad():
        return model(**inputs).logits.float()


def assert_peft_export_matches(run: Path, out: Path) -> None:
    """`cl-scale export RUN --format peft` loaded by PEFT on the base gives the stage model's logits (1e-5)."""
    from cl_scale.export import export_run
    from cl_scale.local_stage import load_run
    from cl_scale.modeling.loading import model_dir

    export_run(run, out, fmt="peft")
    stage = load_run(run)
    inputs = sample_inputs(stage)
    expected = stage_logits(stage, inputs)
    got = peft_logits(model_dir(stage.recipe.model), [out], stage.kind, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
