"""The shared file readers turn a damaged file into one CLScaleError that names it and says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cl_scale.errors import CLScaleError, read_safetensors


def test_read_safetensors_returns_the_tensors_of_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(path))
    tensors = read_safetensors(path, problem="unused", fix="unused")
    assert list(tensors) == ["w"] and torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("damage", ["truncated", "missing", "not safetensors"])
def test_read_safetensors_names_a_damaged_file_and_the_fix(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "snapshot.safetensors"
    if damage != "missing":
        save_file({"w": torch.ones(64)}, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b'{"json": true}')
    with pytest.raises(CLScaleError) as err:
        read_safetensors(path, problem=f"stage snapshot {path} cannot be read", fix="retrain the stage")
    assert err.value.problem.startswith(f"stage snapshot {path} cannot be read (")
    assert err.value.fix == "retrain the stage"
