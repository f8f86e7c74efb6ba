"""Exercise cl_scale.distributed's collectives on 2 gloo ranks in strict mode: `python collectives.py OUT_DIR`.

Started by tests/test_distributed_two_ranks.py as two processes (RANK / WORLD_SIZE / MASTER_* set); each
rank writes what it observed to OUT_DIR/rank<k>.json for the test to compare against the expected values.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

from cl_scale import distributed
from cl_scale.subspace import agree


def observe() -> dict:
    me = distributed.rank()
    seen: dict = {"rank": me, "world": distributed.world_size()}
    seen["per_rank"] = distributed.per_rank(me + 0.5)

    mine = torch.full((3, 2), 7.0) if me == 0 else torch.zeros(5)  # ranks disagree on the shape
    agreed = agree(mine)
    seen["agree"] = {"shape": list(agreed.shape), "values": sorted(set(agreed.flatten().tolist()))}

    summed = torch.full((2,), float(me + 1))
    returned = distributed.all_reduce_sum(summed)
    seen["all_reduce"] = {"in_place": summed.tolist(), "same_object": returned is summed}

    seen["all_gather_object"] = distributed.all_gather_object({"rank": me})
    seen["broadcast_object"] = distributed.broadcast_object(f"from {me}", src=1)
    seen["inference_trace"] = inference_trace_restart()
    return seen


def inference_trace_restart() -> dict:
    """Whether `restart_zero_trace` invalidates the trace of a ZeRO-3 engine built without an optimizer."""
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    coordinator = engine.optimizer.get_param_coordinator()
    with torch.no_grad():
        for _ in range(2):  # the second forward completes the trace the first recorded
            engine(torch.ones(1, 4))
    complete_before = coordinator.is_complete_trace()
    distributed.restart_zero_trace(engine)
    result = {"complete_before": complete_before, "invalid_after": coordinator.is_invalid_trace()}
    engine.destroy()
    return result


def main(out_dir: Path) -> None:
    with distributed.process_group(timeout_s=60):
        seen = observe()
        distributed.barrier()
    (out_dir / f"rank{seen['rank']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
