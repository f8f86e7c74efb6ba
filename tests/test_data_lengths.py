from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from cl_scale.data.lengths import Percentiles, token_length_stats


def words(counts: list[int]) -> list[str]:
    return [" ".join(["w"] * n) for n in counts]


def test_word_percentiles_are_nearest_rank() -> None:
    ds = Dataset.from_dict({"prompt": words(list(range(1, 101))), "target": words([1] * 100)})
    stats = token_length_stats(ds, None, max_source_length=1000, max_target_length=10)
    assert stats.prompt == Percentiles(p50=50, p90=90, p99=99, max=100)
    assert stats.unit == "words"


def test_truncation_counts_use_the_limits() -> None:
    ds = Dataset.from_dict({"prompt": words([5, 10, 20]), "target": words([1, 3, 4])})
    stats = token_length_stats(ds, None, max_source_length=10, max_target_length=3)
    assert (stats.truncated_prompts, stats.truncated_answers) == (1, 1)


def test_token_counts_include_one_special_token(llama_tokenizer: PreTrainedTokenizerBase) -> None:
    prompt, target = "Reverse the list.\na b c\nOutput: ", "c b a"
    stats = token_length_stats(
        Dataset.from_dict({"prompt": [prompt], "target": [target]}),
        llama_tokenizer,
        max_source_length=100,
        max_target_length=100,
    )
    n_prompt = len(llama_tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1
    n_answer = len(llama_tokenizer(target, add_special_tokens=False)["input_ids"]) + 1
    assert (stats.prompt.max, stats.answer.max, stats.unit) == (n_prompt, n_answer, "tokens")
