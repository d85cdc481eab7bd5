"""The hooks a nanogpt plugin can implement.

A plugin is a module (or object) with functions marked ``@nanogpt_core.hookimpl``
whose names match the specifications below. Plugins are found through the
``nanogpt`` entry-point group; the built-in ones are registered the same way.
"""

from __future__ import annotations

from typing import Any

import pluggy

API_VERSION = "1.2.0"
"""The version of the plugin API, by semantic versioning, apart from the package's.

The API is ``nanogpt_core``'s ``__all__``, these hooks and the protocols they
document. 1.0.0 is what releases 0.1.0 and 0.2.0 documented; 1.1.0 (0.3.0) added a
source's optional ``token_estimate``, a callback's optional
``planned_checkpoints``, ``tokens_from_text_bytes`` and this constant; 1.2.0 (0.4.0)
added ``TrainConfig``'s sharding, activation-checkpointing, guard and timeout
fields and the ``skipped_steps`` metric. A plugin
module may declare what it supports, ``NANOGPT_API = ">=1.0,<2"`` (a PEP 440
specifier); one that excludes this version is a warning line when it loads.
"""

hookspec = pluggy.HookspecMarker("nanogpt")
hookimpl = pluggy.HookimplMarker("nanogpt")


@hookspec
def register_datasets(register: Any) -> None:
    """Register dataset plugins.

    :param register: call ``register(name, factory, options=OptionsClass)`` once per
        dataset. ``options`` is a frozen attrs class whose fields are the keys the
        experiment's ``[dataset]`` table may set; ``factory(options)`` returns a
        :class:`nanogpt_core.DatasetSource`.
    """


@hookspec
def register_callbacks(register: Any) -> None:
    """Register training callbacks.

    :param register: call ``register(name, factory, options=OptionsClass)`` once per
        callback. ``factory(options)`` returns a :class:`nanogpt_core.Callback`;
        it is called once per run in which an experiment's ``[[callbacks]]`` names it.
    """


@hookspec
def register_tokenizers(register: Any) -> None:
    """Register tokenizers.

    :param register: call ``register(name, TokenizerClass, options=OptionsClass)`` once
        per tokenizer. ``TokenizerClass(options)`` makes a new tokenizer for a dataset
        that names it; ``TokenizerClass.from_description(description)`` rebuilds one
        from what its ``description()`` returned (stored in ``meta.json`` and in every
        checkpoint), so sampling and export need no original files.
    """


@hookspec
def register_templates(register: Any) -> None:
    """Register prompt templates for instruction tuning and chat.

    :param register: call ``register(name, TemplateClass, options=OptionsClass)`` once
        per template. ``TemplateClass(options)`` makes a template; a template turns an
        instruction (and an optional input) into the prompt a fine-tuned model answers,
        and ``TemplateClass.from_description(description)`` rebuilds one from what its
        ``description()`` returned (stored in ``meta.json`` and in checkpoints, so
        ``gpt chat`` needs nothing else).
    """


@hookspec
def register_eval_tasks(register: Any) -> None:
    """Register evaluation tasks for ``gpt eval`` and the ``eval`` callback.

    :param register: call ``register(name, TaskClass, options=OptionsClass)`` once per
        task. ``TaskClass(options)`` makes a task; its ``evaluate(evaluator)`` scores the
        model the :class:`nanogpt_core.Evaluator` holds and returns a
        :class:`nanogpt_core.EvalResult`. An experiment's ``[eval.<name>]`` table sets
        the options.
    """


@hookspec
def register_optimizers(register: Any) -> None:
    """Register optimizers.

    :param register: call ``register(name, factory, options=OptionsClass)`` once per
        optimizer. An experiment picks one with ``[train] optimizer = "name"`` and sets
        its options in ``[train.name]``; ``factory(options)`` returns an object whose
        ``build(model, train, device_type)`` returns the ``torch.optim.Optimizer`` for
        the model, each param group's peak learning rate in ``group["peak_lr"]``
        (default: its ``lr``).
    """


@hookspec
def register_schedules(register: Any) -> None:
    """Register learning-rate schedules.

    :param register: call ``register(name, factory, options=OptionsClass)`` once per
        schedule. An experiment picks one with ``[train] schedule = "name"`` and sets
        its options in ``[train.name]``; ``factory(options)`` returns an object whose
        ``lr(step, *, peak, floor, warmup_steps, total_steps)`` is the learning rate of
        a param group at the 0-based ``step``, given its peak and its floor.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add subcommands to the ``gpt`` command.

    :param cli: the ``gpt`` :class:`click.Group`; decorate new commands with
        ``@cli.command()``.
    """
