"""Running a list of experiments unattended: what ``gpt batch`` does.

Each experiment runs in its own subprocess (optionally behind a launcher such as
``accelerate launch``), so a crash or an out-of-memory in one does not end the
batch. Finished experiments (a ``done`` marker beside their results) are
skipped; interrupted ones resume from their checkpoints.

Signals: each experiment runs in its own process group, so a Ctrl-C typed in the
terminal reaches only ``gpt batch``, which passes each SIGINT and SIGTERM it gets
on to the running experiment (which therefore sees it once, not twice) and waits
for it to save and exit. On Linux the experiment is also killed if ``gpt batch``
itself is killed (``PR_SET_PDEATHSIG``), so it never outlives its batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core.config.experiment import ExperimentConfig
from nanogpt_core.config.experiment_file import load_experiment, read_toml
from nanogpt_core.errors import ConfigError, NanoGPTError
from nanogpt_core.train.callbacks import RunPaths
from nanogpt_core.train.run import finished_summary, read_done

LIST_FILE = "experiment_list.conf"
PLOT_FILE = "batch-summary.png"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BatchInterrupted(NanoGPTError):
    """SIGINT or SIGTERM stopped the batch once the running experiment exited: exit 130."""

    exit_code = 130


@attrs.define
class BatchResult:
    """How one experiment of a batch went."""

    experiment: Path
    name: str
    status: str  # "done", "skipped", "failed", "stopped"
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
    """Run each experiment in a subprocess and report how each went.

    :raises ConfigError: two experiments would write the same results folder
        (checked before anything runs).
    :raises BatchInterrupted: SIGINT or SIGTERM stopped the batch; the summary
        table has been printed.
    """
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    loaded = load_all(experiments)
    check_unique_names(loaded)
    results: list[BatchResult] = []
    with StopSignals() as stop:
        for experiment, config in loaded:
            if isinstance(config, NanoGPTError):
                for line in str(config).splitlines():
                    print(f"Error: {line}", file=sys.stderr, flush=True)
                results.append(
                    BatchResult(experiment, experiment.stem, "failed", detail="bad experiment file")
                )
            else:
                result = _run_one(experiment, config, prefix, rerun, results_dir, data_dir, stop)
                results.append(result)
            if stop.received:
                print(summary_table(results), flush=True)
                raise BatchInterrupted(
                    f"batch stopped by {stop.received} at {experiment}; "
                    "run the same batch again to continue where it stopped"
                )
            if stop_on_error and results[-1].status == "failed":
                break
    return results


Loaded = list[tuple[Path, "ExperimentConfig | NanoGPTError"]]


def load_all(experiments: Sequence[Path]) -> Loaded:
    """Each experiment file loaded (without plugins: enough for its name), or its error."""
    loaded: Loaded = []
    for experiment in experiments:
        try:
            loaded.append((experiment, load_experiment(experiment)))
        except NanoGPTError as exc:
            loaded.append((experiment, exc))
    return loaded


def check_unique_names(loaded: Loaded) -> None:
    """Refuse two experiments that would write the same ``results/<name>/`` folder.

    The second would otherwise resume from the first one's checkpoint, or be
    skipped as already done.
    """
    first: dict[str, Path] = {}
    problems: list[str] = []
    for experiment, config in loaded:
        if isinstance(config, NanoGPTError):
            continue
        if config.name in first:
            problems.append(
                f"{first[config.name]} and {experiment} both write results/{config.name}/; "
                'give one of them another `name = "..."`'
            )
        else:
            first[config.name] = experiment
    if problems:
        raise ConfigError(problems)


def _run_one(
    experiment: Path,
    config: ExperimentConfig,
    prefix: list[str],
    rerun: bool,
    results_dir: Path,
    data_dir: Path,
    stop: StopSignals,
) -> BatchResult:
    paths = RunPaths(results_dir / config.name)
    done = paths.done
    if finished_summary(config, paths) is not None and not rerun:
        return _finished(experiment, config.name, "skipped", done, 0.0)
    command = [
        *prefix, "-m", "nanogpt_core", "run", str(experiment),
        "--results-dir", str(results_dir), "--data-dir", str(data_dir),
    ]  # fmt: skip
    if rerun and done.exists():
        command.append("--fresh")
    print(f"== {experiment}: {shlex.join(command)}", flush=True)
    start = time.monotonic()
    code = stop.run(command)
    duration = time.monotonic() - start
    if code == 0 and done.exists():
        return _finished(experiment, config.name, "done", done, duration)
    status = "stopped" if stop.received else "failed"
    detail = "not started" if code is None else f"exit status {code}"
    return BatchResult(experiment, config.name, status, duration_s=duration, detail=detail)


class StopSignals:
    """While active, SIGINT and SIGTERM are passed on to the running experiment.

    The experiment runs in a process group of its own, so a Ctrl-C in the
    terminal (sent to the whole foreground group) reaches it only through us,
    once: a second Ctrl-C is then a real second one, which aborts ``gpt run`` at
    once as it would without a batch.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signum)

    def run(self, command: list[str]) -> int | None:
        """Run ``command`` in its own process group, tied to our life.

        :returns: its exit status, or None when a signal came before it started.
        """
        # Hold the signals while starting it: one that arrives in between is
        # handled (and passed on) as soon as the child is known.
        with _signals_held():
            if self.received:
                return None
            self._child = subprocess.Popen(command, preexec_fn=_child_setup(os.getpid()))
        try:
            return self._child.wait()
        finally:
            self._child = None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _child_setup(parent: int) -> Callable[[], None]:
    """What the experiment's process does between fork and exec."""

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # the fork inherited our hold
        os.setpgid(0, 0)
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            # The batch may have died before prctl took effect: nobody would kill us then.
            if os.getppid() != parent:
                os._exit(1)

    return setup


def _finished(experiment: Path, name: str, status: str, done: Path, duration: float) -> BatchResult:
    summary = read_done(RunPaths(done.parent)) or {}
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


def write_batch_plot(results: Sequence[BatchResult], results_dir: Path) -> Path | None:
    """Draw the loss curves of the batch's runs into ``results/batch-summary.png``.

    Never fails the batch: without matplotlib it says how to get it, and any
    other problem is one warning line. Returns the file, or None if none was written.
    """
    from nanogpt_core.eval.compare import PLOT_EXTRA, read_runs, write_plot

    folders = [
        results_dir / r.name for r in results if (results_dir / r.name / "metrics.jsonl").is_file()
    ]
    if not folders:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            f"note: for a plot of the batch ({results_dir / PLOT_FILE}): {PLOT_EXTRA}",
            file=sys.stderr,
        )
        return None
    out = results_dir / PLOT_FILE
    try:
        write_plot(read_runs(folders), out)
    except Exception as exc:  # a plot is never worth a failed batch
        print(f"warning: could not write {out}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    print(f"wrote {out}", flush=True)
    return out
