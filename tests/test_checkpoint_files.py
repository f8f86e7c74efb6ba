"""Which checkpoint inside a task `--resume` trusts: the newest one rank 0 marked complete, never one cut short."""

from __future__ import annotations

import json
from pathlib import Path

from cl_scale.checkpoint import COMPLETE, newest_complete

LAYOUT = {"world_size": 2, "global_batch": 16, "per_device_batch": 4}


def _tag(root: Path, name: str, step: int | None, layout: dict[str, int] = LAYOUT) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    if step is not None:
        (folder / COMPLETE).write_text(json.dumps({"step": step, "layout": layout,
                                                    "log": [{"step": s} for s in range(1, step + 1)]}))
    return folder


def test_newest_complete_checkpoint_wins_and_a_partial_one_is_removed(tmp_path: Path) -> None:
    _tag(tmp_path, "step-0000005", 5)
    _tag(tmp_path, "step-0000010", 10)
    partial = _tag(tmp_path, "step-0000015", None)  # ranks were writing when the job died
    (tmp_path / "zero_to_fp32.py").write_text("# DeepSpeed's script beside the tags\n")
    found = newest_complete(tmp_path, LAYOUT)
    assert found is not None and (found.tag, found.step) == ("step-0000010", 10)
    assert [r["step"] for r in found.log] == list(range(1, 11))
    assert not partial.exists()


def test_no_checkpoint_when_none_is_complete(tmp_path: Path) -> None:
    _tag(tmp_path, "step-0000005", None)
    assert newest_complete(tmp_path, LAYOUT) is None
    assert newest_complete(tmp_path / "missing", LAYOUT) is None


def test_a_checkpoint_of_another_world_size_is_not_resumed(tmp_path: Path) -> None:
    _tag(tmp_path, "step-0000005", 5, {**LAYOUT, "world_size": 4})
    assert newest_complete(tmp_path, LAYOUT) is None
