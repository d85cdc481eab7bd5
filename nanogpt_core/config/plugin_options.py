"""The second pass of loading: each plugin table structured into its plugin's options class.

The first pass (:func:`~nanogpt_core.config.experiment_file.load_experiment`) leaves the
options of ``[dataset]``, ``[tokenizer]``, ``[template]``, ``[[callbacks]]``,
``[train.<name>]`` and ``[eval.<task>]`` as plain dicts, since which class checks
them depends on the plugins installed. Here each plugin is looked up by name
(with a "did you mean" when there is none) and its table structured into the
options class it registered; every problem becomes one ``key.path: message`` line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.config.experiment import ExperimentConfig, PluginSpec, TrainConfig
from nanogpt_core.errors import ConfigError, PluginError
from nanogpt_core.eval.suite import check_task_names
from nanogpt_core.plugins.options import OptionProblems, join, show, structure, suggest

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins


def resolve_plugins(
    config: ExperimentConfig,
    plugins: Plugins,
    source: str,
    warnings: list[str] | None = None,
) -> ExperimentConfig:
    """Second pass: structure each plugin table into its plugin's options class.

    :param source: the experiment file's name, which starts every problem line.
    :param warnings: where a line for each table of a plugin that is not
        selected (``[train.muon]`` with adamw) is appended.
    """
    problems: list[str] = []
    ignored: list[str] = []
    datasets = plugins.datasets()
    callbacks = plugins.callbacks()
    tokenizers = plugins.tokenizers()

    def resolve(spec: PluginSpec, registry: dict[str, Any], kind: str, path: str) -> PluginSpec:
        registration = registry.get(spec.plugin)
        if registration is None:
            installed = ", ".join(sorted(registry)) or "none"
            problems.append(
                f"{join(path, 'plugin')}: no {kind} plugin named {spec.plugin!r}"
                f"{suggest(spec.plugin, list(registry))}; installed: {installed}"
            )
            return spec
        try:
            options = structure(spec.options, registration.options, path)
        except OptionProblems as exc:
            problems.extend(exc.problems)
            return spec
        return attrs.evolve(spec, options=options)

    dataset = resolve(config.dataset, datasets, "dataset", "dataset")
    tokenizer = config.tokenizer and resolve(config.tokenizer, tokenizers, "tokenizer", "tokenizer")
    template = config.template and resolve(
        config.template, plugins.templates(), "template", "template"
    )
    resolved_callbacks = [
        resolve(spec, callbacks, "callback", f"callbacks[{i}]")
        for i, spec in enumerate(config.callbacks)
    ]
    eval_options = {
        task: resolve_eval_table(task, table, plugins, problems)
        for task, table in config.eval.items()
    }
    names = [spec.plugin for spec in config.callbacks]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(f"callbacks[{i}].plugin: {name!r} is already enabled above")
    train = resolve_train_tables(config.train, plugins, problems, ignored)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    if warnings is not None:
        warnings.extend(f"{source}: {line}" for line in ignored)
    return attrs.evolve(
        config,
        dataset=dataset,
        tokenizer=tokenizer,
        template=template,
        callbacks=resolved_callbacks,
        train=train,
        eval=eval_options,
    )


def resolve_eval_table(task: str, table: Any, plugins: Plugins, problems: list[str]) -> Any:
    """One ``[eval.<task>]`` table structured into the task's options (problems appended)."""
    path = join("eval", task)
    try:
        check_task_names([task], plugins, path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return table
    registration = plugins.eval_tasks()[task]
    try:
        return structure(table, registration.options, path)
    except OptionProblems as exc:
        problems.extend(exc.problems)
        return table


def resolve_train_tables(
    train: TrainConfig, plugins: Plugins, problems: list[str], ignored: list[str] | None = None
) -> TrainConfig:
    """Second pass for ``[train]``: the selected optimizer and schedule, and their tables.

    The selected plugins' tables (absent ones too: their defaults) become their
    options instances. A table for a registered optimizer or schedule that is not
    selected is checked and then left out, so ``--set train.optimizer=adamw`` works on
    an experiment with a ``[train.muon]`` table; a line saying so is appended to
    ``ignored``. A table naming neither is a problem, appended to ``problems``.
    """
    resolved: dict[str, Any] = {}
    selected = {"optimizer": train.optimizer, "schedule": train.schedule}
    for kind, name in selected.items():
        registry = plugins.registry(kind)
        try:
            registration = registry.get(name)
        except PluginError as exc:
            problems.append(f"train.{kind}: {exc}")
            continue
        if registration is None:
            installed = ", ".join(sorted(registry)) or "none"
            problems.append(
                f"train.{kind}: no {kind} named {name!r}{suggest(name, list(registry))}; "
                f"installed: {installed}"
            )
            continue
        options = _structure_train_table(train, name, registration, problems)
        if options is not None:
            resolved[name] = options
    for name in train.plugin_options:
        if name in selected.values():
            continue
        try:
            registration = train_table_owner(plugins, name)
        except PluginError as exc:
            problems.append(f"train.{name}: {exc}")
            continue
        if registration is None:
            known = sorted({*plugins.optimizers(), *plugins.schedules()})
            problems.append(
                f"train.{name}: unknown table: no optimizer or schedule is named "
                f"{name!r}{suggest(name, known)}; optimizers: "
                f"{', '.join(sorted(plugins.optimizers())) or 'none'}; schedules: "
                f"{', '.join(sorted(plugins.schedules())) or 'none'}"
            )
            continue
        _structure_train_table(train, name, registration, problems)  # checked, not used
        if ignored is not None:
            ignored.append(
                unselected(
                    f"[train.{name}]",
                    f"train.{registration.kind}",
                    name,
                    selected[registration.kind],
                )
            )
    return attrs.evolve(train, plugin_options=resolved)


def unselected(table: str, key: str, wanted: str, actual: str) -> str:
    """The warning for options that nothing uses: one rule for plugin tables and model keys."""
    return f"{table} is ignored: {key} is {show(actual)}; remove it or set {key} = {show(wanted)}"


def _structure_train_table(
    train: TrainConfig, name: str, registration: Any, problems: list[str]
) -> Any:
    table = train.plugin_options.get(name, {})
    if not isinstance(table, dict):  # already structured (a config resolved twice)
        return table
    try:
        return structure(table, registration.options, f"train.{name}")
    except OptionProblems as exc:
        problems.extend(exc.problems)
        return None


def train_table_owner(plugins: Plugins, name: str) -> Any:
    """The optimizer or schedule registration a ``[train.<name>]`` table belongs to, or None.

    A name registered as both kinds is the optimizer's; a name two plugins
    registered raises the conflict's :class:`PluginError`.
    """
    for kind in ("optimizer", "schedule"):
        registration = plugins.registry(kind).get(name)
        if registration is not None:
            return registration
    return None
