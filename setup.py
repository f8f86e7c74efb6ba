"""Build step that puts copies of the top-level recipes/ and ds_configs/ into the package (cl_scale/_shipped/).

Everything else about the project is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

FOLDERS = ("recipes", "ds_configs")  # cl_scale.shipped.FOLDERS; setup.py cannot import the package


class BuildWithShippedFiles(build_py):
    """build_py, then the shipped folders copied under the built package (not for editable installs,
    which read the folders themselves)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "cl_scale" / "_shipped"
        for folder in FOLDERS:
            shutil.rmtree(target / folder, ignore_errors=True)
            shutil.copytree(folder, target / folder, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildWithShippedFiles})
