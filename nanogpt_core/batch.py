"""Running a list of experiments unattended: what ``gpt batch`` does.

Each experiment runs in its own subprocess (optionally behind a launcher such as
``accelerate launch``), so a crash or an out-of-memory in one does not end the
batch. Finished experiments (a ``done`` marker beside their results) are
skipped; interrupted ones resume from their checkpoints.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from nanogpt_core.callbacks import RunPaths
from nanogpt_core.config import load_experiment, read_toml
from nanogpt_core.errors import NanoGPTError
from nanogpt_core.run import finished_summary

LIST_FILE = "experiment_list.conf"


@attrs.define
class BatchResult:
    """How one experiment of a batch went."""

    experiment: Path
    name: str
    status: str  # "done", "skipped", "failed"
    val_loss: float | None = None
    steps: int | None = None
    duration_s: float = 0.0
    detail: str = ""


def is_abstract(path: Path) -> bool:
    """Whether an experiment file itself says ``abstract = true`` (not inherited)."""
    return read_toml(path, str(path)).get("abstract") is True


def experiments_in(paths: Sequence[Path]) -> list[Path]:
    """The experiment files named by ``paths``, in order.

    A folder runs the files its ``experiment_list.conf`` lists (one a line, ``#``
    comments), else its ``*.toml`` files in sorted order, skipping abstract bases.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            listing = path / LIST_FILE
            if listing.is_file():
                for number, line in enumerate(listing.read_text().splitlines(), 1):
                    entry = line.split("#", 1)[0].strip()
                    if not entry:
                        continue
                    listed = path / entry
                    if not listed.is_file():
                        raise NanoGPTError(f"{listing}: line {number}: {entry}: file not found")
                    found.append(listed)
            else:
                found.extend(p for p in sorted(path.glob("*.toml")) if not is_abstract(p))
        elif path.is_file():
            if is_abstract(path):
                raise NanoGPTError(
                    f"{path}: abstract = true: a base to extend, not an experiment to run"
                )
            found.append(path)
        else:
            raise NanoGPTError(f"{path}: no such file or folder")
    if not found:
        raise NanoGPTError(f"no experiments found in {', '.join(map(str, paths))}")
    return found


def run_batch(
    experiments: Sequence[Path],
    *,
    launcher: str | None,
    rerun: bool,
    stop_on_error: bool,
    results_dir: Path,
    data_dir: Path,
) -> list[BatchResult]:
    """Run each experiment in a subprocess and report how each went."""
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    results: list[BatchResult] = []
    for experiment in experiments:
        try:
            config = load_experiment(experiment)
        except NanoGPTError as exc:
            for line in str(exc).splitlines():
                print(f"Error: {line}", file=sys.stderr, flush=True)
            results.append(
                BatchResult(experiment, experiment.stem, "failed", detail="bad experiment file")
            )
            if stop_on_error:
                break
            continue
        name = config.name
        paths = RunPaths(results_dir / name)
        done = paths.done
        if finished_summary(config, paths) is not None and not rerun:
            results.append(_finished(experiment, name, "skipped", done, 0.0))
            continue
        command = [
            *prefix, "-m", "nanogpt_core", "run", str(experiment),
            "--results-dir", str(results_dir), "--data-dir", str(data_dir),
        ]  # fmt: skip
        if rerun and done.exists():
            command.append("--fresh")
        print(f"== {experiment}: {shlex.join(command)}", flush=True)
        start = time.monotonic()
        code = subprocess.run(command, check=False).returncode
        duration = time.monotonic() - start
        if code == 0 and done.exists():
            results.append(_finished(experiment, name, "done", done, duration))
        else:
            results.append(
                BatchResult(
                    experiment, name, "failed", duration_s=duration, detail=f"exit status {code}"
                )
            )
            if stop_on_error:
                break
    return results


def _finished(experiment: Path, name: str, status: str, done: Path, duration: float) -> BatchResult:
    summary = json.loads(done.read_text())
    return BatchResult(
        experiment, name, status, summary.get("val_loss"), summary.get("step"), duration
    )


def summary_table(results: Sequence[BatchResult]) -> str:
    """The batch's results as an aligned text table."""
    rows = [("experiment", "status", "val loss", "steps", "duration")]
    for r in results:
        rows.append(
            (
                r.name,
                r.status + (f" ({r.detail})" if r.detail else ""),
                f"{r.val_loss:.4f}" if r.val_loss is not None else "-",
                str(r.steps) if r.steps is not None else "-",
                f"{r.duration_s:.0f}s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
