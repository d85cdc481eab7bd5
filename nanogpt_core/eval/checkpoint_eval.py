"""Evaluating a checkpoint file: what ``gpt eval`` does.

The checkpoint carries its model and tokenizer, so tasks such as HellaSwag need
nothing else; ``val_loss`` also needs the experiment whose data to score. With
``log = True`` the results are appended to the metrics of the run the
checkpoint belongs to (``results/<name>/checkpoints/<file>.pth``), under that
run's lock, so a live ``gpt run`` of the same folder is never written beside.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.errors import NanoGPTError
from nanogpt_core.eval.evaluator import Evaluator
from nanogpt_core.eval.suite import EvalSuite, TaskReport, eval_metrics
from nanogpt_core.train.callbacks import RunPaths

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.plugins.registry import Plugins


@attrs.frozen
class CheckpointEval:
    """The reports of one ``gpt eval`` and the checkpoint they are of."""

    checkpoint: Path
    step: int
    reports: list[TaskReport]

    def to_json(self) -> dict[str, Any]:
        """One JSON object: the checkpoint, its step, and each task's metrics."""
        from nanogpt_core.eval.suite import reports_json

        return {
            "checkpoint": str(self.checkpoint),
            "step": self.step,
            "tasks": reports_json(self.reports),
        }


def run_of(checkpoint: Path) -> RunPaths | None:
    """The run folder a checkpoint belongs to: ``<root>/checkpoints/x.pth`` with a metrics file."""
    folder = checkpoint.resolve().parent
    if folder.name != "checkpoints":
        return None
    paths = RunPaths(folder.parent)
    return paths if paths.metrics.is_file() else None


def check_loggable(checkpoint: Path) -> RunPaths:
    """The run to ``--log`` into, or a one-line refusal before any work is done."""
    paths = run_of(checkpoint)
    if paths is None:
        raise NanoGPTError(
            f"--log: {checkpoint} is not in a run's folder (results/<name>/checkpoints/ "
            "beside a metrics.jsonl); leave out --log"
        )
    return paths


def evaluate_checkpoint(
    checkpoint: Path,
    tasks: Sequence[str],
    plugins: Plugins,
    *,
    experiment: ExperimentConfig | None = None,
    data_dir: Path = Path("data"),
    device: str = "auto",
    limit: int | None = None,
    batch_size: int = 8,
    options: Mapping[str, Any] | None = None,
) -> CheckpointEval:
    """Load the checkpoint, prepare the experiment's data if given, and run the tasks."""
    from nanogpt_core.config.experiment import TrainConfig
    from nanogpt_core.data.plugins import unwrapped
    from nanogpt_core.generate.sampling import load_model, pick_device
    from nanogpt_core.train.run import make_accelerator

    pick_device(device)  # a clear line for --device cuda without CUDA
    accelerator = make_accelerator(TrainConfig(device=device))
    loaded = load_model(checkpoint, str(accelerator.device))
    data = None
    if experiment is not None:
        data = _prepared_data(experiment, plugins, data_dir, accelerator, loaded, checkpoint)
    suite = EvalSuite.build(tasks, options, plugins)
    evaluator = Evaluator(
        model=loaded.model,
        tokenizer=unwrapped(loaded.tokenizer),  # as raised: a task may catch what it raises
        accelerator=accelerator,
        batch_size=batch_size,
        limit=limit,
        experiment=experiment,
        data=data,
    )
    reports = suite.run(evaluator)
    return CheckpointEval(checkpoint, loaded.step, reports)


def _prepared_data(
    experiment: ExperimentConfig,
    plugins: Plugins,
    data_dir: Path,
    accelerator: Any,
    loaded: Any,
    checkpoint: Path,
) -> Any:
    """The experiment's data (prepared if needed), refused if the model cannot read it."""
    from nanogpt_core.data.preparation import prepare_dataset
    from nanogpt_core.data.token_windows import check_token_range
    from nanogpt_core.main_process import on_main_process
    from nanogpt_core.train.resume import tokenizer_difference

    data = on_main_process(
        accelerator,
        lambda: prepare_dataset(experiment, plugins, data_dir=Path(data_dir)),
        others="repeat",
    )
    difference = tokenizer_difference(loaded.tokenizer.description(), dict(data.tokenizer))
    if difference:
        raise NanoGPTError(
            f"{checkpoint}: its tokenizer is not the experiment's data's ({difference}); "
            "evaluate it with the experiment it was trained on"
        )
    if data.kind == "tokens":  # examples were checked id by id when prepared
        for split in ("train", "val"):
            check_token_range(data.split_path(split), data.dtype, loaded.model.config.vocab_size)
    return data


def append_to_run(paths: RunPaths, result: CheckpointEval) -> dict[str, Any]:
    """Append one metrics line (``eval/<task>/<metric>`` at the checkpoint's step) to the run.

    Holds the run's lock: a run still training in that folder is refused, not
    interleaved with.
    """
    from nanogpt_core.train.metrics import MetricsLog

    record = {
        "step": result.step,
        **eval_metrics(result.reports),
        "eval_checkpoint": result.checkpoint.name,
    }
    with _run_lock(paths):
        MetricsLog(paths.metrics, enabled=True).append(record)
    return record


@contextlib.contextmanager
def _run_lock(paths: RunPaths) -> Iterator[None]:
    from nanogpt_core.locks import locked

    with locked(paths.lock, wait=False, purpose=f"results folder {paths.root}"):
        yield


def print_json(result: CheckpointEval) -> str:
    """The ``--json`` output."""
    return json.dumps(result.to_json(), indent=2)


def task_options(
    tasks: Sequence[str],
    plugins: Plugins,
    experiment: ExperimentConfig | None,
    data: Path | None,
    assignments: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Each task's raw options: the experiment's ``[eval.<task>]``, then ``--data``, then ``--option``.

    ``--data FILE`` sets the ``data`` option of every task that has one;
    ``--option TASK.KEY=VALUE`` sets any option (the value a TOML literal).
    The result is still to be checked against each task's options class.
    """
    from nanogpt_core.config.overrides import parse_value
    from nanogpt_core.eval.suite import check_task_names
    from nanogpt_core.plugins.options import path_fields, unstructure

    check_task_names(tasks, plugins, "--task")
    registry = plugins.eval_tasks()
    chosen: dict[str, dict[str, Any]] = {}
    for task in tasks:
        given = experiment.eval.get(task, {}) if experiment is not None else {}
        chosen[task] = dict(given if isinstance(given, dict) else unstructure(given))
    if data is not None:
        takers = [t for t in tasks if "data" in attrs.fields_dict(registry[t].options)]
        if not takers:
            raise NanoGPTError(f"--data: no task here reads a data file ({', '.join(tasks)})")
        for task in takers:
            chosen[task]["data"] = str(data.expanduser().absolute())
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        task, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise NanoGPTError(
                f"--option {assignment}: expected TASK.KEY=VALUE, e.g. hellaswag.data=x.jsonl"
            )
        if task not in chosen:
            raise NanoGPTError(
                f"--option {assignment}: {task!r} is not a task of this evaluation ({', '.join(tasks)})"
            )
        value = parse_value(text)
        if name in path_fields(registry[task].options) and isinstance(value, str) and value:
            value = str(Path(value).expanduser().absolute())
        chosen[task][name] = value
    return chosen
