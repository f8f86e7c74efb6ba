"""What a stop signal after a stage's training does at the next boundary (data pass, evaluation cell):
stop at once when the last step is checkpointed, else finish and commit the stage first. The 2-rank run
that is signalled during its evaluation is in tests/test_train_checkpoint.py."""

from types import SimpleNamespace

import pytest
from rich.console import Console

from cl_scale.errors import StopRequested
from cl_scale.trainer import _AfterTraining


def after_training(*, every: int, signalled: bool) -> tuple[_AfterTraining, list[int]]:
    asked: list[int] = []

    def agreed() -> bool:
        asked.append(1)
        return signalled

    session = SimpleNamespace(tasks=["reverse", "sort"], console=Console(file=None, quiet=True),
                              recipe=SimpleNamespace(train=SimpleNamespace(checkpoint_every_steps=every)))
    return _AfterTraining(session, SimpleNamespace(agreed=agreed), 1), asked


def test_with_checkpoints_a_signal_stops_at_the_next_boundary() -> None:
    after, _ = after_training(every=5, signalled=True)
    with pytest.raises(StopRequested):
        after.check()


def test_without_checkpoints_a_signal_lets_the_stage_finish_and_stops_after_its_commit() -> None:
    after, asked = after_training(every=0, signalled=True)
    after.check()
    after.check()
    assert after.deferred
    assert len(asked) == 1  # once noted, the later boundaries need no collective


def test_without_a_signal_every_boundary_asks_and_nothing_stops() -> None:
    after, asked = after_training(every=5, signalled=False)
    after.check()
    after.check()
    assert not after.deferred and len(asked) == 2
