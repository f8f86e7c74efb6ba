"""data.chat_template: the prompt as a user turn with the generation prompt, the answer as the assistant
turn, loss on the answer and its end of turn only, and the gate's prompt tokens the same in training and
in generation. References are the rendered strings written out by hand and tokenised directly."""

import copy
from types import SimpleNamespace

import pytest

from cl_scale.data.collators import IGNORE_INDEX
from cl_scale.data.examples import make_examples
from cl_scale.data.pipeline import tokenize_examples
from cl_scale.errors import CLScaleError

# Written with {{ '\n' }}: HF renders templates with trim_blocks, which drops a newline after a block tag.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token + '\n' }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PROMPT, ANSWER = "Reverse the words: red green blue\nOutput: ", "blue green red"


@pytest.fixture
def chat_tokenizer(llama_tokenizer):
    tokenizer = copy.deepcopy(llama_tokenizer)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def data_section(**data: object) -> SimpleNamespace:
    """The recipe's data section, as far as tokenising reads it."""
    fields = {"chat_template": True, "trailing_space": "prompt", "max_source_length": 128, "max_target_length": 16}
    return SimpleNamespace(**{**fields, **data})


def examples(prompt: str = PROMPT, answer: str = ANSWER):
    return make_examples({"id": ["e0"], "task": ["t"], "definition": [""], "input": [""], "references": [[answer]],
                          "target": [answer]}).add_column("prompt", [prompt])


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def rendered_prompt(prompt: str = PROMPT) -> str:
    return f"<s><|user|>\n{prompt}\n<|assistant|>\n"


def train_row(tokenizer, **data: object) -> dict:
    return tokenize_examples(data_section(**data), tokenizer, "causal", examples(), prompts_only=False).rows[0]


def test_training_row_is_the_rendered_prompt_then_the_answer_and_its_end_of_turn(chat_tokenizer) -> None:
    prompt = ids(chat_tokenizer, rendered_prompt())
    answer = [*ids(chat_tokenizer, ANSWER), chat_tokenizer.eos_token_id]
    assert train_row(chat_tokenizer)["input_ids"] == prompt + answer


def test_loss_falls_on_the_answer_and_end_of_turn_only(chat_tokenizer) -> None:
    row = train_row(chat_tokenizer)
    n_prompt = len(ids(chat_tokenizer, rendered_prompt()))
    learnt = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert (row["labels"][:n_prompt], learnt) == (
        [IGNORE_INDEX] * n_prompt, [*ids(chat_tokenizer, ANSWER), chat_tokenizer.eos_token_id]
    )


def test_gate_reads_the_same_prompt_tokens_in_training_and_generation(chat_tokenizer) -> None:
    row = train_row(chat_tokenizer)
    generation = tokenize_examples(data_section(), chat_tokenizer, "causal", examples(), prompts_only=True).rows[0]
    gated = [t for t, m in zip(row["input_ids"], row["prompt_mask"]) if m]
    assert gated == generation["input_ids"] == ids(chat_tokenizer, rendered_prompt())
    assert generation["prompt_mask"] == [1] * len(generation["input_ids"])


def test_an_over_long_prompt_loses_its_start_not_the_template(chat_tokenizer) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200)) + "\nOutput: "
    rows = tokenize_examples(data_section(max_source_length=40), chat_tokenizer, "causal", examples(long_prompt),
                             prompts_only=True).rows[0]["input_ids"]
    text = chat_tokenizer.decode(rows)
    assert len(rows) <= 40 and text.startswith("<s><|user|>\n") and text.endswith("Output: \n<|assistant|>\n")
    assert "word199" in text and "word0 " not in text


def test_a_long_answer_is_cut_but_keeps_its_end_of_turn(chat_tokenizer) -> None:
    row = tokenize_examples(data_section(max_target_length=3), chat_tokenizer, "causal",
                            examples(answer="one two three four"), prompts_only=False).rows[0]
    learnt = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert learnt == [*ids(chat_tokenizer, "one two three four")[:2], chat_tokenizer.eos_token_id]


def test_off_by_default_gives_the_plain_prompt(chat_tokenizer) -> None:
    from cl_scale.recipe import DataConfig

    row = train_row(chat_tokenizer, chat_template=DataConfig(tasks=["x"]).chat_template)
    assert row["input_ids"][: len(ids(chat_tokenizer, PROMPT)) + 1] == [chat_tokenizer.bos_token_id, *ids(chat_tokenizer, PROMPT)]


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(llama_tokenizer) -> None:
    assert not llama_tokenizer.chat_template
    with pytest.raises(CLScaleError, match="has no chat template"):
        train_row(llama_tokenizer)


def test_a_template_whose_turn_does_not_end_with_eos_is_a_clear_error(chat_tokenizer) -> None:
    chat_tokenizer.chat_template = TEMPLATE.replace("eos_token + '\n'", "'<|end|>\n'")
    with pytest.raises(CLScaleError, match="does not end with the tokenizer's EOS token"):
        train_row(chat_tokenizer)


def test_chat_template_on_an_encoder_decoder_is_a_clear_error(t5_tokenizer) -> None:
    with pytest.raises(CLScaleError, match="encoder-decoder"):
        tokenize_examples(data_section(), t5_tokenizer, "seq2seq", examples(), prompts_only=False)


def test_trailing_space_in_answer_on_an_encoder_decoder_is_a_clear_error(t5_tokenizer) -> None:
    with pytest.raises(CLScaleError, match="data.trailing_space=prompt"):
        tokenize_examples(data_section(chat_template=False, trailing_space="answer"), t5_tokenizer, "seq2seq",
                          examples(), prompts_only=False)


def test_trailing_space_in_answer_with_a_chat_template_is_refused_when_the_recipe_loads() -> None:
    from pathlib import Path

    from cl_scale.recipe import load_recipe

    demo = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
    with pytest.raises(CLScaleError, match="trailing_space=answer is for plain prompts"):
        load_recipe(demo, ["data.chat_template=true", "data.trailing_space=answer"])
    assert load_recipe(demo, ["data.trailing_space=answer"]).data.trailing_space == "answer"


def test_chat_template_without_a_template_stops_training_before_the_run_directory(tmp_path, tiny_llama_dir) -> None:
    from cl_scale.recipe import load_recipe
    from cl_scale.trainer import run_training
    from tests.trainer_helpers import write_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_llama_dir, data={"chat_template": True},
                                      output={"dir": str(tmp_path / "runs")}))
    with pytest.raises(CLScaleError, match="has no chat template"):
        run_training(recipe, resume=False, run_dir=None, allow_changed_recipe=False)
    assert not (tmp_path / "runs").exists()
