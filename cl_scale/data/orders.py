"""The named task orders of the published continual-learning runs, so recipes can refer to them by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cl_scale.data.names import unknown_name
from cl_scale.errors import CLScaleError

if TYPE_CHECKING:
    from cl_scale.data.own_tasks import TaskFiles

_SUPERNI_ORDER1 = [
    "task1572_samsum_summary",
    "task363_sst2_polarity_classification",
    "task1290_xsum_summarization",
    "task181_outcome_extraction",
    "task002_quoref_answer_generation",
    "task1510_evalution_relation_extraction",
    "task639_multi_woz_user_utterance_generation",
    "task1729_personachat_generate_next",
    "task073_commonsenseqa_answer_generation",
    "task1590_diplomacy_text_generation",
    "task748_glucose_reverse_cause_event_detection",
    "task511_reddit_tifu_long_text_summarization",
    "task591_sciq_answer_generation",
    "task1687_sentiment140_classification",
    "task875_emotion_classification",
]

_SUPERNI_ORDER2 = [
    "task748_glucose_reverse_cause_event_detection",
    "task073_commonsenseqa_answer_generation",
    "task1590_diplomacy_text_generation",
    "task639_multi_woz_user_utterance_generation",
    "task1572_samsum_summary",
    "task1687_sentiment140_classification",
    "task591_sciq_answer_generation",
    "task363_sst2_polarity_classification",
    "task1510_evalution_relation_extraction",
    "task1729_personachat_generate_next",
    "task181_outcome_extraction",
    "task511_reddit_tifu_long_text_summarization",
    "task002_quoref_answer_generation",
    "task1290_xsum_summarization",
    "task875_emotion_classification",
]

# GainLoRA's "Long order 3" is O-LoRA's order 6; its "Long order 4" is O-LoRA's order 4.
ORDERS: dict[str, list[str]] = {
    "superni_order1": _SUPERNI_ORDER1,
    "superni_order2": _SUPERNI_ORDER2,
    "long_order3": "yelp amazon mnli cb copa qqp rte imdb sst2 dbpedia agnews yahoo multirc boolq wic".split(),
    "long_order4": "mnli cb wic copa qqp boolq rte imdb yelp amazon sst2 dbpedia agnews multirc yahoo".split(),
    "long_order5": "multirc boolq wic mnli cb copa qqp rte imdb sst2 dbpedia agnews yelp amazon yahoo".split(),
    "standard_order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "standard_order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "standard_order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    # Shared-input synthetic tasks: each one overwrites what the previous taught, so forgetting shows.
    "synthetic_demo": ["first", "reverse", "last", "sort"],
}


def resolve_tasks(order: str | None, tasks: Sequence[str | TaskFiles] | None) -> list[str]:
    """The task names of a run, in order: a named order or an explicit list (names and own tasks), never both,
    so the order is unambiguous; every name once, whatever source it comes from."""
    if order is not None and tasks is not None:
        raise CLScaleError("data.order and data.tasks are both set", "keep one: a named order or an explicit task list")
    if order is not None:
        if order not in ORDERS:
            raise unknown_name("order", order, ORDERS)
        return list(ORDERS[order])
    if not tasks:
        raise CLScaleError("no tasks to train", f"set data.order to one of {', '.join(ORDERS)} or list data.tasks")
    names = [task if isinstance(task, str) else task.name for task in tasks]
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise CLScaleError(
            f"data.tasks lists {', '.join(repeated)} more than once (task names must be unique across all sources)",
            "list every task once; give an own task a name of its own",
        )
    return names
