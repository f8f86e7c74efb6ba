"""cl_scale.distributed's collectives on two real gloo ranks, strict mode on (one launch, about 15 s)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer_helpers import REPO, environment, free_port

SCRIPT = REPO / "tests" / "multirank" / "collectives.py"

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the two ranks saw, in rank order."""
    out = tmp_path_factory.mktemp("collectives")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
            env=environment(out / "cache", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu"),
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for r, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {r} failed ({proc.returncode}):\n{output[-4000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_both_ranks_ran_in_one_world_of_two(observed: list[dict]) -> None:
    assert [(o["rank"], o["world"]) for o in observed] == [(0, 2), (1, 2)]


def test_per_rank_reports_every_ranks_value_in_rank_order(observed: list[dict]) -> None:
    assert all(o["per_rank"] == [0.5, 1.5] for o in observed)


def test_agree_gives_rank_zeros_value_even_where_a_rank_holds_another_shape(observed: list[dict]) -> None:
    # rank 0 holds a (3, 2) tensor of 7s, rank 1 a (5,) tensor of 0s: a sum of zeros could not reconcile them
    assert all(o["agree"] == {"shape": [3, 2], "values": [7.0]} for o in observed)


def test_all_reduce_sum_sums_in_place_and_returns_the_callers_tensor(observed: list[dict]) -> None:
    assert all(o["all_reduce"] == {"in_place": [3.0, 3.0], "same_object": True} for o in observed)


def test_object_collectives_gather_and_broadcast(observed: list[dict]) -> None:
    assert all(o["all_gather_object"] == [{"rank": 0}, {"rank": 1}] for o in observed)
    assert all(o["broadcast_object"] == "from 1" for o in observed)


def test_restart_zero_trace_invalidates_an_inference_engines_trace(observed: list[dict]) -> None:
    # an engine without an optimizer keeps its coordinator on DeepSpeedZeRoOffload, not optimizer.parameter_offload
    assert all(o["inference_trace"] == {"complete_before": True, "invalid_after": True} for o in observed)
