"""Calling the experiment's callbacks, and keeping the state they see.

The trainer calls every hook through :class:`HookDispatch`: on each enabled
callback in the experiment's order, with the current :class:`TrainerState`.
Text a callback adds is folded into the state before the next callback runs, so
a logger sees it whatever order the callbacks are listed in. An exception
becomes one :class:`PluginFault` line naming the callback and the hook. The
metrics callbacks log through :meth:`TrainerState.log_metrics` become one
``metrics.jsonl`` line here, which every callback then sees in ``on_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import attrs

from nanogpt_core.data.plugins import plugin_call
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.train.callbacks import Callback, Requests, TrainerState
from nanogpt_core.train.checkpoints import PLAIN_DATA, plain_data_problem
from nanogpt_core.train.metrics import MetricsLog


class HookDispatch:
    """Calls hooks on the enabled callbacks and owns the state handed to them.

    :param state: the state before the first hook.
    :param requests: what callbacks ask for (the one ``state`` carries).
    :param callbacks: the enabled callbacks, in the experiment's order.
    :param plugins: each callback's plugin name, in the same order.
    :param metrics_log: where the lines of logged metrics go.
    :param elapsed: training seconds so far (the ``elapsed_s`` of those lines).
    :param echo: prints a line on the main process.
    """

    def __init__(
        self,
        state: TrainerState,
        requests: Requests,
        callbacks: list[Callback],
        plugins: list[str],
        metrics_log: MetricsLog,
        elapsed: Callable[[], float],
        echo: Callable[[str], None],
    ) -> None:
        self.state = state
        self.requests = requests
        self.callbacks = callbacks
        self.plugins = plugins
        self.metrics_log = metrics_log
        self.elapsed = elapsed
        self.echo = echo

    def update(self, **changes: Any) -> None:
        """Hand the following hooks a state with ``changes`` (the state itself is frozen)."""
        self.state = attrs.evolve(self.state, **changes)

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every enabled callback, in the experiment's order.

        Text a callback adds is folded into the state before the next one runs.
        An exception becomes one :class:`PluginFault` line naming the callback.
        """
        for position, (plugin, callback) in enumerate(
            zip(self.plugins, self.callbacks, strict=True)
        ):
            try:
                getattr(callback, hook)(self.state, *args)
            except (NanoGPTError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise PluginFault(
                    f"callback {plugin!r} (callbacks[{position}]) failed in {hook}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if self.requests.texts:
                texts, self.requests.texts = tuple(self.requests.texts), []
                self.update(texts=self.state.texts + texts)

    def step_ended(self, *, evaluated: bool, epoch_ended: bool) -> None:
        """The hooks that follow an optimizer step, in the protocol's order.

        ``on_metrics`` with the step's line (when it logged one), ``on_step_end``,
        then ``on_eval_end`` and ``on_epoch_end`` when the step evaluated or
        ended an epoch.
        """
        if self.state.record is not None:
            self.call("on_metrics", self.state.record)
        self.call("on_step_end")
        if evaluated:
            self.call("on_eval_end")
        if epoch_ended:
            self.call("on_epoch_end")

    def end_failed_run(self) -> None:
        """``on_train_end`` with status ``"failed"`` for every callback, dropping what they ask.

        Nothing from a failed run is saved or logged. Every callback gets its
        ``on_train_end`` (to close files, say), and an error in one is only a
        warning: the error that failed the run is the one to report.
        """
        self.update(status="failed")
        self._drop_requests()
        for plugin, callback in zip(self.plugins, self.callbacks, strict=True):
            try:
                callback.on_train_end(self.state)
            except Exception as exc:
                self.echo(f"warning: callback {plugin!r} failed in on_train_end: {exc}")
        self._drop_requests()

    def _drop_requests(self) -> None:
        self.requests.saves.clear()
        self.requests.metrics.clear()

    def write_logged(self) -> None:
        """One ``metrics.jsonl`` line with the metrics callbacks logged, then ``on_metrics``."""
        logged, self.requests.metrics = self.requests.metrics, {}
        if not logged:
            return
        record: dict[str, Any] = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "tokens": self.state.metrics.get("tokens", 0),
            **logged,
            "elapsed_s": self.elapsed(),
        }
        self.metrics_log.append(record)
        self.update(metrics={**self.state.metrics, **logged})
        self.call("on_metrics", MappingProxyType(record))

    def who(self, position: int) -> str:
        """How messages name the callback at ``position``: ``callback 'x' (callbacks[i])``."""
        return f"callback {self.plugins[position]!r} (callbacks[{position}])"

    def callback_states(self) -> list[dict[str, Any]]:
        """Each callback's ``state_dict``, with where it sits, as a checkpoint keeps them.

        Checked before any file is written: a state that is not a dict of plain
        data (:data:`~nanogpt_core.train.checkpoints.PLAIN_DATA`) would make the
        checkpoint unloadable, so it stops the run naming the callback (exit 1).
        """
        states = []
        for position, (plugin, callback) in enumerate(
            zip(self.plugins, self.callbacks, strict=True)
        ):
            with plugin_call(self.who(position), "state_dict"):
                state = callback.state_dict()
            if type(state) is not dict:
                problem: str | None = f"it returned a {type(state).__name__}, not a dict"
            else:
                problem = plain_data_problem(state, "state_dict()")
            if problem:
                raise PluginFault(
                    f"{self.who(position)}: {problem}; a checkpoint holds only plain data "
                    f"({PLAIN_DATA}), so nothing was saved"
                )
            states.append({"position": position, "plugin": plugin, "state": state})
        return states

    def load_callback_states(self, states: dict[int, dict[str, Any]]) -> None:
        """Give each callback back its saved state, by position; a raise names the callback."""
        for position, state in states.items():
            with plugin_call(self.who(position), "load_state_dict"):
                self.callbacks[position].load_state_dict(state)
