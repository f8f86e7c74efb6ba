"""Where the prompt's trailing space is tokenised, and what it does to a real model's first answer token.

    python bench/answer_boundary.py --model "$(python -m cl_scale.real_model)" [--examples 24]

The Long Sequence prompt ends with "Output: ". With `data.trailing_space=prompt` (the published layout) a
byte-level BPE tokenizer ends the prompt with a lone space token and starts the answer with a word
without its space, a pair it rarely saw in pre-training; `data.trailing_space=answer` tokenises the same
text with the space inside the answer's first token. For each task of recipes/smollm2_long4.yaml this
prints the base model's mean negative log-likelihood (nats) of the first answer token and of the whole
answer with its EOS, in both layouts, from rows built by cl-scale's own pipeline: the loss a method
starts its first step from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_long4.yaml"


def answer_nll(model: torch.nn.Module, row: dict) -> tuple[float, float]:
    """(first answer token, mean over the answer and EOS) negative log-likelihood of one training row."""
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    scored = (labels[1:] != -100).nonzero().flatten()
    nll = -logp[scored, labels[1:][scored]]
    return nll[0].item(), nll.mean().item()


def main() -> None:
    from cl_scale.data.pipeline import prepare_task
    from cl_scale.modeling.loading import load_tokenizer
    from cl_scale.recipe import load_recipe
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the SmolLM2 folder (`python -m cl_scale.real_model` prints it)")
    parser.add_argument("--examples", type=int, default=24, help="test examples per task")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"{'task':<8} {'layout':<8} {'first-token NLL':>16} {'answer NLL':>11}")
    for task in load_recipe(RECIPE, [f"model.path={args.model}"]).data.tasks:
        for layout in ("prompt", "answer"):
            sets = [f"model.path={args.model}", f"data.trailing_space={layout}", f"data.max_eval_examples={args.examples}"]
            recipe = load_recipe(RECIPE, sets)
            tokenizer = load_tokenizer(recipe.model)
            rows = prepare_task(recipe.data, recipe.train.seed, tokenizer, "causal", task, "test", prompts_only=False,
                                cache_dir=None).rows
            firsts, means = zip(*(answer_nll(model, row) for row in rows))
            print(f"{task:<8} {layout:<8} {sum(firsts) / len(firsts):>16.2f} {sum(means) / len(means):>11.2f}", flush=True)


if __name__ == "__main__":
    main()
