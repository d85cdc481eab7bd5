"""Running evaluation tasks by name: what ``gpt eval`` and the ``eval`` callback share.

A task is looked up in the ``eval_task`` registry, made from its options (an
experiment's ``[eval.<task>]`` table, or the defaults), handed an
:class:`~nanogpt_core.eval.evaluator.Evaluator` and timed. Each result becomes a
:class:`TaskReport`; :func:`eval_metrics` names its values the way
``metrics.jsonl`` logs them, ``eval/<task>/<metric>``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.errors import ConfigError, NanoGPTError, PluginError, PluginFault
from nanogpt_core.eval.evaluator import EvalResult, Evaluator
from nanogpt_core.plugins.options import OptionProblems, structure, suggest

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins


@attrs.frozen
class TaskReport:
    """One task's result: its metrics, how many examples, how long it took, notes."""

    task: str
    metrics: dict[str, float]
    n: int
    seconds: float
    notes: tuple[str, ...] = ()


def eval_task_names(plugins: Plugins) -> list[str]:
    """The installed eval tasks, sorted."""
    return sorted(plugins.eval_tasks())


def check_task_names(names: Sequence[str], plugins: Plugins, where: str) -> None:
    """Refuse a name no plugin registered, with a suggestion (one line per name)."""
    registry = plugins.eval_tasks()
    problems = []
    for name in names:
        try:
            known = registry.get(name) is not None
        except PluginError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not known:
            installed = ", ".join(sorted(registry)) or "none"
            problems.append(
                f"{where}: no eval task named {name!r}{suggest(name, list(registry))}; "
                f"installed: {installed}"
            )
    if problems:
        raise ConfigError(problems)


def make_tasks(
    names: Sequence[str], plugins: Plugins, options: Mapping[str, Any] | None = None
) -> list[tuple[str, Any]]:
    """``(name, task)`` for each name, made with its options or the task's defaults.

    :param options: task name to its structured options (an experiment's
        ``[eval.<task>]`` tables after loading) or to a raw dict still to check.
    """
    check_task_names(names, plugins, "--task")
    registry = plugins.eval_tasks()
    tasks = []
    for name in names:
        registration = registry[name]
        chosen = (options or {}).get(name, {})
        if isinstance(chosen, dict):
            try:
                chosen = structure(chosen, registration.options, f"eval.{name}")
            except OptionProblems as exc:
                raise ConfigError(exc.problems) from None
        try:
            task = registration.factory(chosen)
        except NanoGPTError:
            raise
        except Exception as exc:
            raise PluginFault(
                f"plugin {registration.plugin!r}: eval task {name!r} failed in its factory: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not callable(getattr(task, "evaluate", None)):
            raise PluginError(
                f"plugin {registration.plugin!r}: eval task {name!r}: its factory returned "
                f"{type(task).__name__}, which has no evaluate(evaluator) method"
            )
        tasks.append((name, task))
    return tasks


def run_tasks(tasks: Sequence[tuple[str, Any]], evaluator: Evaluator) -> list[TaskReport]:
    """Evaluate each task in turn; a task that raises is one line naming it (exit 1)."""
    reports = []
    for name, task in tasks:
        started = time.perf_counter()
        try:
            result = task.evaluate(evaluator)
        except NanoGPTError:
            raise
        except Exception as exc:
            raise PluginFault(
                f"eval task {name!r} failed in evaluate: {type(exc).__name__}: {exc}"
            ) from exc
        _check_result(name, result)
        reports.append(
            TaskReport(
                task=name,
                metrics={key: float(value) for key, value in result.metrics.items()},
                n=int(result.n),
                seconds=time.perf_counter() - started,
                notes=tuple(_unprefixed(name, str(note)) for note in result.notes),
            )
        )
    return reports


def _unprefixed(task: str, note: str) -> str:
    """A note without the task's name in front: whoever shows notes puts it there, once.

    Tasks often word their lines as errors are worded (``hellaswag: ...``); shown
    as ``note: <task>: <note>``, that would name the task twice.
    """
    prefix = f"{task}: "
    return note[len(prefix) :] if note.startswith(prefix) else note


def _check_result(name: str, result: Any) -> None:
    if not isinstance(result, EvalResult):
        raise PluginFault(
            f"eval task {name!r}: evaluate returned {type(result).__name__}, "
            "expected nanogpt_core.EvalResult"
        )
    for key, value in result.metrics.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise PluginFault(f"eval task {name!r}: metric name {key!r} must be a word without '/'")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PluginFault(f"eval task {name!r}: metric {key!r} is {value!r}, not a number")


@attrs.frozen
class EvalSuite:
    """Named eval tasks made from their options, ready to evaluate a model.

    ``EvalSuite.build(["hellaswag"], options)`` looks the names up in the
    ``eval_task`` registry; ``suite.run(evaluator)`` evaluates them in turn.
    """

    tasks: tuple[tuple[str, Any], ...]

    @staticmethod
    def check_names(names: Sequence[str], where: str, plugins: Plugins | None = None) -> None:
        """Refuse names no installed plugin registered, one line each naming ``where``.

        :param plugins: where the names are looked up; the installed plugins when None.
        """
        check_task_names(names, _or_installed(plugins), where)

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        options: Mapping[str, Any] | None = None,
        plugins: Plugins | None = None,
    ) -> EvalSuite:
        """Make each named task with its options (an experiment's ``eval`` tables) or defaults.

        :param plugins: where the names are looked up; the installed plugins when None.
        """
        return cls(tuple(make_tasks(names, _or_installed(plugins), options)))

    def run(self, evaluator: Evaluator) -> list[TaskReport]:
        """Evaluate every task (every process must call it); one report each."""
        return run_tasks(self.tasks, evaluator)


def _or_installed(plugins: Plugins | None) -> Plugins:
    """``plugins``, or the installed plugins when None.

    Only :class:`EvalSuite`'s public methods accept None: the built-in ``eval``
    callback is a plugin and has no plugin manager to pass. The core's own
    callers (``gpt eval``, config checks) pass theirs to :func:`make_tasks` and
    :func:`check_task_names`, which take no None.
    """
    from nanogpt_core.plugins.registry import load_plugins

    return plugins if plugins is not None else load_plugins()


def eval_metrics(reports: Sequence[TaskReport]) -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}``: how results are logged to ``metrics.jsonl``."""
    return {
        f"eval/{report.task}/{metric}": value
        for report in reports
        for metric, value in report.metrics.items()
    }


def format_table(reports: Sequence[TaskReport]) -> str:
    """A plain-text table: task, metric, value, n, seconds."""
    rows = [("task", "metric", "value", "n", "seconds")]
    for report in reports:
        for metric, value in report.metrics.items():
            rows.append(
                (report.task, metric, f"{value:.4f}", str(report.n), f"{report.seconds:.1f}")
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def reports_json(reports: Sequence[TaskReport]) -> dict[str, Any]:
    """The reports as plain data, keyed by task."""
    return {
        report.task: {
            "metrics": report.metrics,
            "n": report.n,
            "seconds": report.seconds,
            "notes": list(report.notes),
        }
        for report in reports
    }
