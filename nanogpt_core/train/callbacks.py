"""The callback protocol and the state the trainer shares with callbacks.

A callback plugin registers a factory that returns a :class:`Callback`. The
trainer calls the callbacks an experiment enables, in the order the experiment
lists them, at each point of a run's life. Callbacks see the run only through the
:class:`TrainerState` they are handed. The state is read-only: a callback that
wants something done *asks*, through the documented requests
(:meth:`TrainerState.request_save`, :meth:`TrainerState.add_text` and
:meth:`TrainerState.log_metrics`), and the core does it. That is how the core stays the one owner of checkpoints and resume
whatever order the callbacks are listed in.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig

CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.pth$")
LAST_CHECKPOINT = "last.pth"
# Keys of every metrics record that the core alone writes.
RESERVED_METRICS = ("step", "epoch", "elapsed_s", "tokens")


@attrs.frozen
class RunPaths:
    """Where a run keeps its files: ``results/<name>/`` and what lies under it."""

    root: Path

    @property
    def name(self) -> str:
        """The experiment's name (the folder's name)."""
        return self.root.name

    @property
    def config(self) -> Path:
        """The resolved experiment, written at run start (``config.json``)."""
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        """One JSON line per logged step (``metrics.jsonl``)."""
        return self.root / "metrics.jsonl"

    @property
    def done(self) -> Path:
        """Written when a run finishes, with its final metrics (``gpt batch`` skips done runs)."""
        return self.root / "done"

    @property
    def checkpoints(self) -> Path:
        """Folder for ``last.pth`` and the other checkpoints."""
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        """``checkpoints/last.pth``: the checkpoint a run resumes from."""
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def logs(self) -> Path:
        """Folder for TensorBoard event files and other loggers."""
        return self.root / "logs"

    @property
    def samples(self) -> Path:
        """Folder for text samples."""
        return self.root / "samples"

    @property
    def lock(self) -> Path:
        """The run's lock file, beside the folder (``results/.<name>.lock``).

        It lives outside ``root`` so that ``--fresh`` can move the folder aside
        while holding it.
        """
        return self.root.parent / f".{self.root.name}.lock"


class Requests:
    """What callbacks asked the core to do; owned and emptied by the trainer."""

    def __init__(self) -> None:
        self.saves: list[str] = []
        self.texts: list[tuple[int, str, str]] = []
        self.metrics: dict[str, float | int | None] = {}


@attrs.frozen
class TrainerState:
    """What a callback may read at each hook, plus the requests it may make.

    The trainer hands each hook a fresh, frozen state; a callback cannot change
    the run by assigning to it. ``model``, ``optimizer`` and ``accelerator`` are
    the live objects, to *use* (sample from the model, read learning rates), not
    to replace.

    Attributes:
        config: the resolved experiment.
        paths: the run's folders and files (:class:`RunPaths`).
        step: optimizer steps completed so far.
        epoch: the current epoch, counted from 1.
        total_steps: ``epochs * steps_per_epoch``.
        steps_per_epoch: optimizer steps per epoch.
        model: the unwrapped model (no DDP or compile wrapper).
        optimizer: the optimizer.
        accelerator: the ``accelerate.Accelerator`` driving the run.
        metrics: the latest value of every metric (``train_loss``, ``val_loss``,
            ``lr``, ``grad_norm``, ``skipped_steps``, ``tokens_per_sec``, ``mfu``,
            ``tokens``, ``elapsed_s``, and what callbacks logged through
            :meth:`log_metrics`), read-only.
        record: the line written to ``metrics.jsonl`` at this step (read-only), or
            None on steps that log nothing.
        texts: text produced during the run so far, as ``(step, tag, text)``
            tuples, added by callbacks through :meth:`add_text`.
        tokenizer: the tokenizer's description, as in the prepared data's meta.
        template: the prompt template's description for fine-tuning data, or None.
        data: the prepared dataset (:class:`nanogpt_core.PreparedData`) the run trains on.
        is_main_process: whether this process writes files.
        status: ``"running"``; in ``on_train_end`` ``"completed"``,
            ``"interrupted"`` (SIGTERM or Ctrl-C; saving is safe) or ``"failed"``
            (the core will not save).
        resumed_from: the step the run resumed from, or None for a fresh start.
        last_saved_step: the step of the newest ``last.pth``, or None.
    """

    config: ExperimentConfig
    paths: RunPaths
    step: int = 0
    epoch: int = 1
    total_steps: int = 0
    steps_per_epoch: int = 1
    model: Any = None
    optimizer: Any = None
    accelerator: Any = None
    metrics: Mapping[str, Any] = attrs.field(factory=dict, converter=MappingProxyType)
    record: Mapping[str, Any] | None = None
    texts: tuple[tuple[int, str, str], ...] = ()
    tokenizer: Mapping[str, Any] = attrs.field(factory=dict)
    template: Mapping[str, Any] | None = None
    data: Any = None
    is_main_process: bool = True
    status: str = "running"
    resumed_from: int | None = None
    last_saved_step: int | None = None
    _requests: Requests = attrs.field(factory=Requests, repr=False, alias="requests")

    def request_save(self, name: str = LAST_CHECKPOINT) -> None:
        """Ask the core to write the checkpoint ``checkpoints/<name>`` after this hook.

        The core builds the checkpoint once however many files are requested,
        writes each atomically (main process only), then calls every callback's
        ``on_checkpoint(state, path)``. The core writes ``last.pth`` on its own
        schedule too (``[train] save_every``, epoch ends, the end of a run), and
        never twice for one step. Requests made while a run fails are dropped:
        nothing from a failed step is saved. Call it on every process alike.

        :param name: a file name ending in ``.pth``, e.g. ``"last.pth"`` (what
            resume reads) or ``"ckpt_epoch_3.pth"``.
        """
        if not isinstance(name, str) or not CHECKPOINT_NAME.match(name):
            raise ValueError(
                f"request_save({name!r}): expected a plain file name ending in .pth, "
                "like 'last.pth'"
            )
        if name not in self._requests.saves:
            self._requests.saves.append(name)

    def add_text(self, tag: str, text: str) -> None:
        """Share a piece of text (a sample, say) with the other callbacks, at this step.

        It shows in ``texts`` of the states handed to later hooks, so a logger
        such as ``tensorboard`` picks it up whatever order the callbacks are in.
        """
        self._requests.texts.append((self.step, str(tag), str(text)))

    def log_metrics(self, metrics: Mapping[str, float | int | None]) -> None:
        """Ask the core to log scalars (``{"eval/hellaswag/acc_norm": 0.31}``) at this step.

        After this round of hooks (and before any checkpoint it writes) the core
        appends one line to ``metrics.jsonl`` with ``step``, ``epoch``,
        ``tokens``, everything logged in the round and ``elapsed_s``, merges the
        keys into ``metrics`` (so checkpoints and ``done`` keep them), and
        calls every callback's ``on_metrics``. Call it on every process alike;
        the main process's values are the ones written.

        :param metrics: names (any string but ``step``, ``epoch``, ``elapsed_s``
            and ``tokens``) to finite numbers or None. A name logged twice in
            one round keeps the later value.
        :raises ValueError: a name or value that cannot be logged.
        """
        if not isinstance(metrics, Mapping):
            raise ValueError(f"log_metrics({metrics!r}): expected a mapping of names to numbers")
        checked: dict[str, float | int | None] = {}
        for key, value in metrics.items():
            checked[_metric_name(key)] = _metric_value(key, value)
        self._requests.metrics.update(checked)


def _metric_name(key: Any) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"log_metrics: the name {key!r} is not a non-empty string")
    if key in RESERVED_METRICS:
        raise ValueError(
            f"log_metrics: {key!r} is written by the core; give the metric another name "
            'such as "eval/<task>/<metric>"'
        )
    return key


def _metric_value(key: str, value: Any) -> float | int | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        with contextlib.suppress(ValueError, RuntimeError):  # a 0-d tensor, a numpy scalar
            value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"log_metrics: {key!r} = {value!r}: expected a number or None, "
            f"got {type(value).__name__}"
        )
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"log_metrics: {key!r} = {value}: expected a finite number or None")
    return float(value)


class Callback:
    """Base class for callbacks: every hook is a no-op, override what you need.

    Hooks run on every process; write files only when ``state.is_main_process``.
    A hook that raises stops the run (exit status 1), naming the callback, the
    hook and the error; the failed step is not saved.
    """

    def on_train_start(self, state: TrainerState) -> None:
        """Called once, after the model, optimizer and data are ready (and after a resume)."""

    def on_step_end(self, state: TrainerState) -> None:
        """Called after each optimizer step; ``state.step`` counts it."""

    def on_eval_end(self, state: TrainerState) -> None:
        """Called after each evaluation; ``state.metrics`` holds ``train_loss`` and ``val_loss``."""

    def on_epoch_end(self, state: TrainerState) -> None:
        """Called after the last step of each epoch."""

    def on_checkpoint(self, state: TrainerState, path: Path) -> None:
        """Called after the core wrote a checkpoint (its own last.pth or a requested one), on every process."""

    def on_metrics(self, state: TrainerState, record: Mapping[str, Any]) -> None:
        """Called after each line the core writes to ``metrics.jsonl``, with that line.

        The one place for loggers (TensorBoard, W&B) to take scalars from: the
        step's training and evaluation line and the lines callbacks logged
        through :meth:`TrainerState.log_metrics`. ``record`` is read-only; it is
        handed to every process, though only the main one writes the file.
        """

    def on_train_end(self, state: TrainerState) -> None:
        """Called once when the run ends, also when it stops early or fails (``state.status``)."""

    def planned_checkpoints(self, epochs: int) -> int:
        """How many checkpoint files besides ``last.pth`` this callback leaves after ``epochs`` epochs.

        Not a hook of the run: ``gpt plan`` and ``gpt run``'s plan line size the
        disk with it. A callback that writes checkpoints (epoch files, best
        models) says how many it keeps.
        """
        return 0

    def state_dict(self) -> dict[str, Any]:
        """This callback's own state, saved in checkpoints: a dict of plain data only.

        Numbers, strings, bools, None, lists, tuples, dicts with string keys and
        tensors (exact types: a numpy number is not one); anything else stops the
        save, naming the callback, before a checkpoint is replaced.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, when a run resumes (before ``on_train_start``)."""


CALLBACK_HOOKS = (
    "on_train_start",
    "on_step_end",
    "on_eval_end",
    "on_epoch_end",
    "on_checkpoint",
    "on_metrics",
    "on_train_end",
)
CALLBACK_METHODS = (*CALLBACK_HOOKS, "state_dict", "load_state_dict")
