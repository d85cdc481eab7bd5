"""Data that cannot fit the disk is refused before anything is written (a real small tmpfs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a tmpfs of ``size`` (``"1m"``) mounted in the test's folder."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{size}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def gpt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_prepare_refuses_up_front_when_the_data_cannot_fit(
    tiny_char_experiment, small_disk, tmp_path
):
    # Tiny Shakespeare: 1,115,394 characters, 2.2 MB as uint16 tokens.
    experiment = tiny_char_experiment("roomy")
    small = small_disk("1m")
    done = gpt("prepare", str(experiment), "--data-dir", str(small / "data"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "needs about 2.1 MiB" in line and "1.0 MiB free" in line
    assert "--data-dir" in line and "Traceback" not in done.stderr
    assert list(small.iterdir()) == []  # not a folder, not a lock file

    # gpt plan says the same before anything runs.
    plan = gpt("plan", str(experiment), "--data-dir", str(small / "data"), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "warning: disk: the data" in plan.stdout

    # Where it fits, the same preparation goes ahead: the refusal is not a guess.
    roomy = small_disk("8m")
    done = gpt("prepare", str(experiment), "--data-dir", str(roomy / "data"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (roomy / "data" / "shakespeare").is_dir()
