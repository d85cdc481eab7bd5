"""The compatibility suite's fixtures: the old-API plugin packages, pip-installed once.

Each folder under ``packages/`` is a plugin distribution written exactly as an
earlier release's documentation told an author to. The session builds them
with pip (offline: ``--no-index --no-build-isolation``, setuptools from this
environment) into a temporary ``--target`` folder, so nothing is installed into
the environment itself; commands run with that folder first on ``PYTHONPATH``,
where ``importlib.metadata`` finds their ``*.dist-info`` and entry points as it
finds any installed distribution.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parent / "packages"


@pytest.fixture(scope="session")
def compat_site(tmp_path_factory) -> Iterator[Path]:
    """A folder holding every package of ``packages/``, installed by pip (removed at the end)."""
    root = tmp_path_factory.mktemp("compat")
    sources = []
    for package in sorted(p for p in PACKAGES.iterdir() if (p / "pyproject.toml").is_file()):
        # Built from a copy: an in-tree build leaves build/ and *.egg-info behind.
        sources.append(shutil.copytree(package, root / "src" / package.name))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
        + ["--no-deps", "--no-index", "--no-build-isolation", "--target", str(site)]
        + [str(s) for s in sources],
        check=True,
        capture_output=True,
    )
    try:
        yield site
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def gpt_compat(compat_site):
    """``gpt_compat(*args, cwd=...)``: run ``gpt`` in a subprocess that sees the compat packages."""

    def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        path = [str(compat_site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, "-m", "nanogpt_core", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
