"""Comparing runs side by side: what ``gpt compare`` prints and plots.

A run is a results folder (``results/<name>/``) with a ``metrics.jsonl``. Every
number shown comes from that file as the run wrote it: the final and best val
loss, steps, tokens and wall time of its last line, the average throughput
(tokens over wall time) and the latest value of each ``eval/...`` score that
callbacks logged. The plot draws every run's train and val loss on shared axes
(and the eval scores in a second panel) with matplotlib's object API and its
Agg canvas, so it needs no display and touches no global pyplot state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.files import atomic_write
from nanogpt_core.train.callbacks import RunPaths
from nanogpt_core.train.metrics import read_metrics
from nanogpt_core.train.run import read_done

PLOT_EXTRA = "pip install 'nanogpt[plot]'"
EVAL_PREFIX = "eval/"
# --x: the metrics key each choice reads, and its axis label.
X_AXES = {
    "step": ("step", "step"),
    "tokens": ("tokens", "tokens"),
    "elapsed": ("elapsed_s", "elapsed (s)"),
}


@attrs.frozen
class RunSummary:
    """One run's metrics, and the numbers ``gpt compare`` shows for it."""

    label: str
    paths: RunPaths
    records: list[dict[str, Any]]
    done: bool

    def last(self, key: str) -> Any:
        """The value of ``key`` in the last line that has it (not None), else None."""
        for record in reversed(self.records):
            if record.get(key) is not None:
                return record[key]
        return None

    def best_val(self) -> tuple[float | None, int | None]:
        """The lowest val loss and the step it was measured at (the first, on a tie)."""
        scored = [(r["val_loss"], r["step"]) for r in self.records if r.get("val_loss") is not None]
        if not scored:
            return None, None
        return min(scored, key=lambda pair: pair[0])

    def evals(self) -> dict[str, float]:
        """The latest value of every ``eval/...`` score in the run."""
        keys = {key for record in self.records for key in record if key.startswith(EVAL_PREFIX)}
        latest = {key: self.last(key) for key in sorted(keys)}
        return {key: value for key, value in latest.items() if value is not None}

    def summary(self) -> dict[str, Any]:
        """The row of the table, with the metrics' own values (``--json``)."""
        best, best_step = self.best_val()
        # The largest step, not the last line's: `gpt eval --log` may append an earlier one.
        steps = max((r["step"] for r in self.records), default=None)
        tokens, wall = self.last("tokens"), self.last("elapsed_s")
        return {
            "run": self.label,
            "path": str(self.paths.root),
            "done": self.done,
            "final_val_loss": self.last("val_loss"),
            "best_val_loss": best,
            "best_val_step": best_step,
            "steps": steps,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_sec": tokens / wall if tokens is not None and wall else None,
            "eval": self.evals(),
        }


def read_runs(folders: Sequence[Path]) -> list[RunSummary]:
    """Each folder's metrics; a folder without ``metrics.jsonl`` is refused.

    Runs are labelled by their folder's name, or by the whole path where two
    folders share a name.

    :raises NanoGPTError: a folder that is not a run.
    """
    for folder in folders:
        if not (Path(folder) / "metrics.jsonl").is_file():
            raise NanoGPTError(
                f"{folder}: not a run folder (no metrics.jsonl); give results/<name>/ folders"
            )
    names = [Path(folder).resolve().name for folder in folders]
    runs = []
    for folder, name in zip(folders, names, strict=True):
        paths = RunPaths(Path(folder))
        records, _torn = read_metrics(paths.metrics)
        label = name if names.count(name) == 1 else str(folder)
        runs.append(RunSummary(label, paths, records, read_done(paths) is not None))
    return runs


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def wall_time(seconds: float | None) -> str:
    """``42.0s``, ``12m05s`` or ``3h25m``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def comparison_table(runs: Sequence[RunSummary]) -> str:
    """The runs as an aligned text table; eval columns are the union of the runs' scores."""
    summaries = [run.summary() for run in runs]
    eval_keys = sorted({key for s in summaries for key in s["eval"]})
    header = ["run", "done", "final val", "best val (step)", "steps", "tokens", "wall", "tokens/s"]
    rows = [header + [key.removeprefix(EVAL_PREFIX) for key in eval_keys]]
    for s in summaries:
        best = "-"
        if s["best_val_loss"] is not None:
            best = f"{s['best_val_loss']:.4f} ({s['best_val_step']})"
        rows.append(
            [
                s["run"],
                "yes" if s["done"] else "no",
                _number(s["final_val_loss"], ".4f"),
                best,
                _number(s["steps"], "d"),
                _number(s["tokens"], ",d"),
                wall_time(s["wall_s"]),
                _number(s["tokens_per_sec"], ",.0f"),
                *(_number(s["eval"].get(key), ".4f") for key in eval_keys),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) + len(eval_keys))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def require_matplotlib(what: str) -> None:
    """Refuse in one line, naming the extra, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NanoGPTError(f"{what} needs matplotlib: {PLOT_EXTRA}") from None


def _series(run: RunSummary, key: str, x_key: str) -> tuple[list[Any], list[Any]]:
    points = [
        (r[x_key], r[key])
        for r in run.records
        if r.get(key) is not None and r.get(x_key) is not None
    ]
    return [x for x, _ in points], [y for _, y in points]


def plot_runs(runs: Sequence[RunSummary], x: str = "step") -> Any:
    """A matplotlib ``Figure``: train and val loss of every run, and eval scores if any.

    Each run has one colour: its train loss a line, its val loss a line with
    markers; eval scores go in a second panel, one line per run and score.

    :param x: ``"step"``, ``"tokens"`` or ``"elapsed"``.
    :raises NanoGPTError: ``x = "tokens"`` for a run whose metrics have no tokens.
    """
    from matplotlib.figure import Figure

    x_key, x_label = X_AXES[x]
    for run in runs:
        if run.records and all(r.get(x_key) is None for r in run.records):
            raise NanoGPTError(
                f"--x {x}: {run.paths.metrics} has no {x_key} (a run from before it was "
                "logged); use --x step"
            )
    has_evals = any(run.evals() for run in runs)
    figure = Figure(figsize=(13 if has_evals else 8, 5), layout="constrained")
    axes = figure.subplots(1, 2 if has_evals else 1, squeeze=False)[0]
    loss = axes[0]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours, strict=True):
        loss.plot(
            *_series(run, "train_loss", x_key), color=colour, alpha=0.6, label=f"{run.label} train"
        )
        loss.plot(
            *_series(run, "val_loss", x_key), color=colour, marker="o", label=f"{run.label} val"
        )
    loss.set(xlabel=x_label, ylabel="loss", title="train and val loss")
    loss.grid(alpha=0.3)
    loss.legend()
    if has_evals:
        scores = axes[1]
        styles = ["-", "--", ":", "-."]
        for run, colour in zip(runs, colours, strict=True):
            for i, key in enumerate(sorted(run.evals())):
                scores.plot(
                    *_series(run, key, x_key),
                    color=colour,
                    linestyle=styles[i % len(styles)],
                    marker=".",
                    label=f"{run.label} {key.removeprefix(EVAL_PREFIX)}",
                )
        scores.set(xlabel=x_label, ylabel="score", title="evaluation")
        scores.grid(alpha=0.3)
        scores.legend()
    return figure


def write_plot(runs: Sequence[RunSummary], out: Path, x: str = "step") -> Any:
    """Draw :func:`plot_runs` and write it to ``out`` as a PNG, atomically; returns the figure.

    The PNG's ``Description`` text names the runs (``runs: a, b``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = plot_runs(runs, x)
    FigureCanvasAgg(figure)  # attaches itself: headless, whatever backend is configured
    buffer = io.BytesIO()
    figure.savefig(
        buffer,
        format="png",
        dpi=100,
        metadata={
            "Title": "gpt compare",
            "Description": "runs: " + ", ".join(run.label for run in runs),
        },
    )
    atomic_write(Path(out), lambda handle: handle.write(buffer.getvalue()))
    return figure
