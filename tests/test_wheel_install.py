"""cl-scale installed from its wheel, away from any checkout: the recipes and DeepSpeed configs ship inside it.

The wheel is built from a copy of what the build reads (so no stale build/ folder leaks in) and installed
into a fresh virtual environment that borrows this environment's dependencies through a .pth line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "cl_scale", "recipes", "ds_configs")


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh virtual environment with cl-scale installed from its wheel."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__", "*.pyc")} if (REPO / name).is_dir() else {}
        copy(REPO / name, source / name, **kwargs)
    built = _run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", root / "dist",
                 cwd=source)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("cl_scale-*.whl")
    venv = root / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    assert made.returncode == 0, made.stderr
    site = Path(_run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=root).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", wheel, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv / "bin"


def _packaged(bin_dir: Path, relative: str, cwd: Path) -> Path:
    code = f"from cl_scale.shipped import shipped_file; print(shipped_file({relative!r}))"
    return Path(_run(bin_dir / "python", "-c", code, cwd=cwd).stdout.strip())


def test_installed_package_is_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = _run(installed / "python", "-c", "import cl_scale; print(cl_scale.__file__)", cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(installed.parent)


def test_shipped_recipes_and_ds_configs_come_from_inside_the_package(installed: Path, tmp_path: Path) -> None:
    for relative in ("recipes/demo.yaml", "recipes/llama7b_order1.yaml", "ds_configs/zero3.json"):
        path = _packaged(installed, relative, tmp_path)
        assert path.is_relative_to(installed.parent), path
        assert path.read_bytes() == (REPO / relative).read_bytes()


def test_recipe_show_reads_a_shipped_recipe_from_another_directory(installed: Path, tmp_path: Path) -> None:
    recipe = _packaged(installed, "recipes/llama7b_order1.yaml", tmp_path)
    shown = _run(installed / "cl-scale", "recipe", "show", recipe, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "config: ds_configs/zero3.json" in shown.stdout


def test_plan_finds_the_shipped_deepspeed_config_from_another_directory(installed: Path, tmp_path: Path) -> None:
    recipe = _packaged(installed, "recipes/demo.yaml", tmp_path)  # built-in model and data: nothing to fetch
    planned = _run(installed / "cl-scale", "plan", recipe, "--set", "deepspeed.config=ds_configs/zero2.json",
                   cwd=tmp_path)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "ZeRO stage 2" in planned.stdout
