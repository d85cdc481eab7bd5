"""Optimizers and learning-rate schedules: the plugin protocols and how the trainer uses them.

Both are plugin kinds (``register_optimizers``, ``register_schedules``); the core
never names one. ``[train] optimizer`` and ``schedule`` pick a registration, its
``[train.<name>]`` table is its options, and ``factory(options)`` makes:

- an optimizer plugin, whose ``build(model, train, device_type)`` returns a
  ``torch.optim.Optimizer`` over every trainable parameter; each param group
  carries its peak learning rate in ``group["peak_lr"]`` (default: its ``lr``);
- a schedule, whose ``lr(step, *, peak, floor, warmup_steps, total_steps)`` is a
  group's learning rate at the 0-based ``step``.

Every group follows the schedule between its own peak and its own floor, the
same fraction ``min_lr / learning_rate`` of that peak. The schedule is asked for
the learning rate itself, not for a multiplier of the peak, so a group whose peak
is ``learning_rate`` gets exactly ``min_lr`` and nanoGPT's values bit for bit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from nanogpt_core.data.plugins import plugin_fault
from nanogpt_core.errors import NanoGPTError, PluginError, PluginFault
from nanogpt_core.plugins.options import OptionProblems, structure

if TYPE_CHECKING:
    import torch

    from nanogpt_core.config.experiment import TrainConfig
    from nanogpt_core.plugins.registry import Plugins, Registration


class OptimizerPlugin(Protocol):
    """What an optimizer factory returns."""

    def build(self, model: torch.nn.Module, train: TrainConfig, device_type: str) -> Any:
        """The ``torch.optim.Optimizer`` for ``model`` (unwrapped, on its device)."""


class Schedule(Protocol):
    """What a schedule factory returns."""

    def lr(
        self, step: int, *, peak: float, floor: float, warmup_steps: int, total_steps: int
    ) -> float:
        """The learning rate at the 0-based ``step`` of a group going from ``peak`` to ``floor``."""


def _registration(plugins: Plugins, kind: str, name: str) -> Registration:
    registry = plugins.registry(kind)
    registration = registry.get(name)  # a conflict raises PluginError, one line
    if registration is None:
        installed = ", ".join(sorted(registry)) or "none"
        raise PluginError(f"train.{kind}: no {kind} named {name!r}; installed: {installed}")
    return registration


def _options(train: TrainConfig, registration: Registration) -> Any:
    """The options instance for the selected plugin, structuring a raw table if need be.

    A config that went through the second pass already holds the instance; one
    built another way (benchmarks, notebooks) gets its table checked here.
    """
    options = train.plugin_options.get(registration.name, {})
    if isinstance(options, registration.options):
        return options
    try:
        return structure(options, registration.options, f"train.{registration.name}")
    except OptionProblems as exc:
        raise PluginError("; ".join(exc.problems)) from None


def _make(plugins: Plugins, kind: str, name: str, train: TrainConfig) -> tuple[Any, str]:
    registration = _registration(plugins, kind, name)
    options = _options(train, registration)
    try:
        return registration.factory(options), registration.plugin
    except NanoGPTError:
        raise
    except Exception as exc:
        raise PluginFault(
            f"plugin {registration.plugin!r}: {kind} {name!r} failed in its factory: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def make_optimizer(
    plugins: Plugins, train: TrainConfig, model: torch.nn.Module, device_type: str
) -> Any:
    """Build ``train.optimizer`` for ``model``; every group gets ``peak_lr``.

    :raises PluginFault: the plugin failed.
    :raises PluginError: it returned something other than an optimizer over every
        trainable parameter.
    """
    import torch

    plugin, owner = _make(plugins, "optimizer", train.optimizer, train)
    where = f"plugin {owner!r}: optimizer {train.optimizer!r}"
    try:
        optimizer = plugin.build(model, train, device_type)
    except NanoGPTError:
        raise
    except Exception as exc:
        raise PluginFault(f"{where} failed in build: {type(exc).__name__}: {exc}") from exc
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise PluginError(
            f"{where}: build returned {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise PluginError(f"{where}: build left parameters out: {', '.join(missing)}")
    for group in optimizer.param_groups:
        group.setdefault("peak_lr", group["lr"])
    return optimizer


def optimizer_who(plugins: Plugins, train: TrainConfig) -> str:
    """How messages name the experiment's optimizer: ``plugin 'p': optimizer 'x'``."""
    registration = _registration(plugins, "optimizer", train.optimizer)
    return f"plugin {registration.plugin!r}: optimizer {train.optimizer!r}"


def optimizer_step(optimizer: Any, who: str) -> None:
    """Update the weights, then drop the gradients; a raise is one line naming the plugin.

    A bare ``try`` costs nothing on the step's path (no context manager, no
    host read); nothing is saved from a step that failed.
    """
    try:
        optimizer.step()
    except NanoGPTError:
        raise
    except Exception as exc:
        raise plugin_fault(who, "step", exc) from exc
    try:
        optimizer.zero_grad(set_to_none=True)
    except NanoGPTError:
        raise
    except Exception as exc:
        raise plugin_fault(who, "zero_grad", exc) from exc


def fault_inside(exc: BaseException, obj: Any, who: str) -> PluginFault | None:
    """A :class:`PluginFault` when ``exc`` was raised inside a method of ``obj``; else None.

    For calls into a library that calls the plugin's object in turn (Accelerate's
    ``prepare`` calls the optimizer's ``state_dict`` and ``load_state_dict``): the
    innermost frame running a method of ``obj`` names the method, and an error
    of the library's own keeps its traceback.
    """
    method = None
    traceback = exc.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_locals.get("self") is obj:
            method = frame.f_code.co_name
        traceback = traceback.tb_next
    return None if method is None else plugin_fault(who, method, exc)


def prepare_contained(accelerator: Any, model: Any, optimizer: Any, who: str) -> Any:
    """``accelerator.prepare(model, optimizer)``; a raise inside the optimizer names its plugin.

    Accelerate calls the optimizer's ``state_dict`` and ``load_state_dict`` while
    it wraps it; an error of its own, or of the model's, keeps its traceback.
    A ``model`` of None prepares the optimizer alone (a model sharded with
    FSDP2 must not be wrapped) and returns ``(None, optimizer)``.
    """
    try:
        if model is None:
            return None, accelerator.prepare(optimizer)
        return accelerator.prepare(model, optimizer)
    except NanoGPTError:
        raise
    except Exception as exc:
        fault = fault_inside(exc, optimizer, who)
        if fault is None:
            raise
        raise fault from exc


def make_schedule(plugins: Plugins, train: TrainConfig) -> tuple[Schedule, str]:
    """The schedule ``train.schedule`` names, and the plugin that registered it."""
    return _make(plugins, "schedule", train.schedule, train)


@attrs.frozen
class LearningRates:
    """Sets every param group's learning rate from the schedule, step by step.

    :param schedule: what the schedule's factory returned.
    :param name: the schedule's name, and ``plugin`` the plugin that registered it
        (for messages).
    :param bounds: ``(peak, floor)`` of each param group, in order.
    :param names: each group's ``name`` (a string an optimizer plugin may put in
        the group), else its index: the ``lr/<name>`` metrics.
    :param warmup_steps: ``train.warmup_steps``, and ``total_steps`` the run's length.
    """

    schedule: Schedule
    name: str
    plugin: str
    bounds: tuple[tuple[float, float], ...]
    names: tuple[str, ...]
    warmup_steps: int
    total_steps: int

    @classmethod
    def for_run(
        cls, schedule: Schedule, plugin: str, optimizer: Any, train: TrainConfig, total_steps: int
    ) -> LearningRates:
        """Each group decays to the fraction ``min_lr / learning_rate`` of its own peak.

        A group whose peak is ``learning_rate`` gets exactly ``min_lr`` (the ratio is 1.0).
        """
        bounds = tuple(
            (float(g["peak_lr"]), train.min_lr * (float(g["peak_lr"]) / train.learning_rate))
            for g in optimizer.param_groups
        )
        return cls(
            schedule=schedule,
            name=train.schedule,
            plugin=plugin,
            bounds=bounds,
            names=tuple(
                g["name"] if isinstance(g.get("name"), str) else str(i)
                for i, g in enumerate(optimizer.param_groups)
            ),
            warmup_steps=train.warmup_steps,
            total_steps=total_steps,
        )

    def at(self, step: int, peak: float, floor: float) -> float:
        """The schedule's learning rate for one group at ``step``, checked."""
        where = f"plugin {self.plugin!r}: schedule {self.name!r}"
        try:
            lr = self.schedule.lr(
                step,
                peak=peak,
                floor=floor,
                warmup_steps=self.warmup_steps,
                total_steps=self.total_steps,
            )
        except NanoGPTError:
            raise
        except Exception as exc:
            raise PluginFault(f"{where} failed in lr: {type(exc).__name__}: {exc}") from exc
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise PluginFault(f"{where}: lr returned {lr!r} at step {step}, not a finite number")
        if lr < 0:
            raise PluginFault(f"{where}: lr returned {lr!r} at step {step}, below 0")
        return float(lr)

    def apply(self, param_groups: list[dict[str, Any]], step: int) -> dict[str, float]:
        """Set each group's ``lr`` for the 0-based ``step``; return the ``lr`` metrics.

        ``lr`` is the first group's rate as set; where the groups' peaks differ
        (Muon's matrices and AdamW's embeddings, a plugin's scaled group) each
        group's is ``lr/<name or index>`` too. Read back from the groups, so
        they are the rates the optimizer steps with.
        """
        for group, (peak, floor) in zip(param_groups, self.bounds, strict=True):
            group["lr"] = self.at(step, peak, floor)
        rates = {"lr": float(param_groups[0]["lr"])}
        if len(set(self.bounds)) > 1:
            rates.update(
                (f"lr/{name}", float(group["lr"]))
                for name, group in zip(self.names, param_groups, strict=True)
            )
        return rates
