"""Finding plugins and collecting what they register.

:func:`load_plugins` builds a fresh pluggy manager, loads every entry point of the
``nanogpt`` group one at a time and returns a :class:`Plugins` object from which
the rest of the core asks for datasets, callbacks, tokenizers, templates,
optimizers, schedules and commands. There is no module-global manager: each call
returns a new, independent one.

A plugin is checked whole when it loads: its hook names and argument names, its
``@hookimpl`` options, and everything its ``register_*`` hooks register. One that
fails any check is *broken*: it is unregistered, reported with its error, and
every other plugin and command keeps working. Two plugins registering the same
name are a *conflict*: only what uses that name fails, naming both. What the
plugin declares (its API versions) and hooks it seems to have meant are checked
by :mod:`nanogpt_core.plugins.contract`, and said as warnings.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from nanogpt_core.errors import PluginError
from nanogpt_core.plugins import contract, hookspecs

# check_callback is imported from here by the trainer; it lives with the other load-time checks.
from nanogpt_core.plugins.contract import check_callback as check_callback
from nanogpt_core.plugins.contract import check_callback_class
from nanogpt_core.plugins.option_types import fields_problem

ENTRY_POINT_GROUP = "nanogpt"
DISABLE_ENV = "GPT_DISABLE_PLUGINS"

# Each plugin kind and the hook that registers it. One generic registry serves all.
KINDS = {
    "dataset": "register_datasets",
    "callback": "register_callbacks",
    "tokenizer": "register_tokenizers",
    "template": "register_templates",
    "eval_task": "register_eval_tasks",
    "optimizer": "register_optimizers",
    "schedule": "register_schedules",
}


@attrs.frozen
class PluginInfo:
    """One plugin that was found: where it came from and, if it failed, why."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None

    @property
    def origin(self) -> str:
        """``plugin 'x' (distribution 1.0)`` for messages."""
        where = f" ({self.distribution} {self.version})" if self.distribution else ""
        return f"plugin {self.name!r}{where}"


@attrs.frozen
class Registration:
    """A dataset, callback, optimizer, ... a plugin registered through a ``register_*`` hook."""

    kind: str
    name: str
    factory: Callable[[Any], Any]
    options: type
    plugin: str
    description: str = ""


@attrs.frozen(kw_only=True)
class NoOptions:
    """The options class of a plugin that takes none."""


class Registry(dict):
    """The registrations of one kind, by name.

    A name two plugins registered is listed (``name in registry`` is true) but
    looking it up raises a :class:`PluginError` naming both: only what uses the
    name fails.
    """

    def __init__(self, kind: str, conflicts: dict[str, str]) -> None:
        super().__init__()
        self.kind = kind
        self.conflicts = conflicts

    def __getitem__(self, name: str) -> Registration:
        if name in self.conflicts:
            raise PluginError(self.conflicts[name])
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """Like ``dict.get``, but a conflicting name raises as ``[]`` does."""
        if name in self.conflicts:
            raise PluginError(self.conflicts[name])
        return super().get(name, default)


class Plugins:
    """A plugin manager and the datasets, callbacks, optimizers, ... and commands it provides."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self.loaded: list[PluginInfo] = []
        self.broken: list[PluginInfo] = []
        # Warning lines by plugin name: loaded, but something its author should fix.
        self.warnings: dict[str, list[str]] = {}
        # Built-in commands a plugin tried to replace, by plugin name.
        self.shadowed: dict[str, list[str]] = {}
        self._registered: dict[str, list[Registration]] = {}
        self._registries: dict[str, Registry] | None = None

    # -- loading ---------------------------------------------------------------

    def register(
        self,
        plugin: object,
        name: str,
        info: PluginInfo | None = None,
        deprecations: Iterable[str] = (),
    ) -> bool:
        """Register a plugin object (entry points, tests, embedding applications).

        Returns whether it was accepted. A plugin with a misspelled hook, wrong
        argument names, a wrapper on a ``register_*`` hook, or a ``register_*``
        hook that fails or registers something invalid is refused: it is
        unregistered and recorded in :attr:`broken`. ``deprecations`` (what
        importing it warned, see :func:`load_plugins`) become warning lines.
        """
        info = info or PluginInfo(name=name, module=getattr(plugin, "__name__", repr(plugin)))
        unknown = contract.unknown_hooks(self.manager, plugin)
        if unknown:
            self.broken.append(attrs.evolve(info, error=unknown))
            return False
        try:
            self.manager.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self.broken.append(attrs.evolve(info, error=f"{exc}"))
            return False
        try:
            self.manager.check_pending()
            self._registered[name] = self._collect_from(name)
        except (pluggy.PluginValidationError, PluginError) as exc:
            self.manager.unregister(name=name)
            self._registered.pop(name, None)
            self.broken.append(attrs.evolve(info, error=f"{exc}"))
            return False
        self.loaded.append(info)
        self._registries = None
        mismatch = contract.api_mismatch(plugin, info.origin)
        lines = [mismatch] if mismatch else []
        lines += [f"{info.origin} {message}" for message in deprecations]
        lines += contract.hook_warnings(self.manager, plugin, info.origin)
        if lines:
            self.warnings[name] = lines
        return True

    def warning_lines(self) -> list[str]:
        """Every warning about the loaded plugins, one line each, in load order."""
        return [line for info in self.loaded for line in self.warnings.get(info.name, [])]

    def _collect_from(self, plugin_name: str) -> list[Registration]:
        """Call this plugin's ``register_*`` hooks and check what they register."""
        found: list[Registration] = []
        plugin = self.manager.get_plugin(plugin_name)
        for kind, hook_name in KINDS.items():
            hook = getattr(self.manager.hook, hook_name)
            for impl in hook.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if impl.hookwrapper or getattr(impl, "wrapper", False):
                    raise PluginError(
                        f"plugin {plugin_name!r}: {hook_name} cannot be a wrapper "
                        "(remove wrapper=True / hookwrapper=True)"
                    )
                found.extend(self._call_register(kind, impl, plugin_name))
        return found

    def _call_register(self, kind: str, impl: Any, plugin_name: str) -> list[Registration]:
        found: list[Registration] = []

        def register(
            name: str,
            factory: Callable[[Any], Any],
            options: type | None = None,
            description: str = "",
        ) -> None:
            options = options or NoOptions
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin_name!r}: {kind} name must be a non-empty string")
            if not attrs.has(options):
                raise PluginError(
                    f"plugin {plugin_name!r}: {kind} {name!r}: options must be an attrs class, "
                    f"got {options!r}"
                )
            if problem := fields_problem(options):  # config.json could not hold its values
                raise PluginError(f"plugin {plugin_name!r}: {kind} {name!r}: {problem}")
            if not callable(factory):
                raise PluginError(
                    f"plugin {plugin_name!r}: {kind} {name!r}: factory {factory!r} is not callable"
                )
            if kind == "callback" and isinstance(factory, type):
                check_callback_class(factory, name, plugin_name)
            if any(r.name == name for r in found):
                raise PluginError(f"plugin {plugin_name!r} registers {kind} {name!r} twice")
            found.append(
                Registration(
                    kind=kind,
                    name=name,
                    factory=factory,
                    options=options,
                    plugin=plugin_name,
                    description=description or first_line(factory.__doc__),
                )
            )

        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r} failed in {KINDS[kind]}: {type(exc).__name__}: {exc}"
            ) from exc
        return found

    # -- what the plugins provide -------------------------------------------

    def registry(self, kind: str) -> Registry:
        """Every registration of ``kind``, one of :data:`KINDS` (``"dataset"``, ``"optimizer"``, ...)."""
        if self._registries is None:
            self._registries = {k: self._merge(k) for k in KINDS}
        return self._registries[kind]

    def datasets(self) -> Registry:
        """Every registered dataset, by name."""
        return self.registry("dataset")

    def callbacks(self) -> Registry:
        """Every registered callback, by name."""
        return self.registry("callback")

    def tokenizers(self) -> Registry:
        """Every registered tokenizer, by name."""
        return self.registry("tokenizer")

    def templates(self) -> Registry:
        """Every registered prompt template, by name."""
        return self.registry("template")

    def eval_tasks(self) -> Registry:
        """Every registered evaluation task, by name."""
        return self.registry("eval_task")

    def optimizers(self) -> Registry:
        """Every registered optimizer, by name."""
        return self.registry("optimizer")

    def schedules(self) -> Registry:
        """Every registered learning-rate schedule, by name."""
        return self.registry("schedule")

    def registrations_of(self, plugin_name: str) -> list[Registration]:
        """What one loaded plugin registered, in the order it registered it."""
        return list(self._registered.get(plugin_name, []))

    def conflicts(self) -> list[str]:
        """One message per name that two or more plugins registered."""
        return [msg for kind in KINDS for msg in self.registry(kind).conflicts.values()]

    def add_commands(self, cli: Any) -> list[str]:
        """Let plugins add subcommands to the ``gpt`` click group.

        Each plugin's hook is called on its own: one that fails is reported
        (the returned messages) and the ``gpt`` command keeps every other command.
        A command named like a command already there (``run``) is refused, the
        first kept, and recorded in :attr:`shadowed`.
        """
        failures: list[str] = []
        hook = self.manager.hook.register_commands
        infos = {info.name: info for info in self.loaded}
        for impl in _ordered(hook.get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                failures.append(
                    f"plugin {impl.plugin_name!r}: register_commands cannot be a wrapper; "
                    "its commands were not added"
                )
                continue
            before = dict(cli.commands)
            try:
                impl.function(**{arg: cli for arg in impl.argnames})
            except Exception as exc:
                failures.append(
                    f"plugin {impl.plugin_name!r} failed in register_commands: "
                    f"{type(exc).__name__}: {exc}"
                )
            info = infos.get(impl.plugin_name)
            origin = info.origin if info else f"plugin {impl.plugin_name!r}"
            names, lines = contract.shadowed_commands(before, cli.commands, origin)
            for command_name in names:
                cli.commands[command_name] = before[command_name]
            if names:
                self.shadowed[impl.plugin_name] = names
            failures += lines
        return failures

    def _plugin_order(self, kind: str) -> list[str]:
        """Plugins in registration order, ``tryfirst`` ones first and ``trylast`` last."""
        impls = getattr(self.manager.hook, KINDS[kind]).get_hookimpls()
        return [impl.plugin_name for impl in _ordered(impls)]

    def _merge(self, kind: str) -> Registry:
        by_name: dict[str, list[Registration]] = {}
        for plugin_name in self._plugin_order(kind):
            for registration in self._registered.get(plugin_name, []):
                if registration.kind == kind:
                    by_name.setdefault(registration.name, []).append(registration)
        conflicts = {
            name: self._conflict_message(kind, name, regs)
            for name, regs in by_name.items()
            if len(regs) > 1
        }
        registry = Registry(kind, conflicts)
        for name, regs in by_name.items():
            dict.__setitem__(registry, name, regs[0])
        return registry

    def _conflict_message(self, kind: str, name: str, regs: list[Registration]) -> str:
        infos = {info.name: info for info in self.loaded}
        origins = " and ".join(
            infos[r.plugin].origin if r.plugin in infos else f"plugin {r.plugin!r}" for r in regs
        )
        return (
            f"{kind} {name!r} is registered by both {origins}; uninstall one or disable it "
            f"with {DISABLE_ENV}={regs[-1].plugin}"
        )


def _ordered(impls: list[Any]) -> list[Any]:
    """Hook implementations in load order, ``tryfirst`` ones first and ``trylast`` ones last.

    pluggy keeps them grouped by these options but calls the last-registered
    first; registries are easier to reason about in load order.
    """
    pluggy_order = {id(impl): i for i, impl in enumerate(impls)}

    def key(impl: Any) -> tuple[int, int]:
        return (0 if impl.tryfirst else 2 if impl.trylast else 1, pluggy_order[id(impl)])

    return sorted(impls, key=key)


def first_line(text: str | None) -> str:
    """The first non-empty line of a docstring, or an empty string."""
    for line in (text or "").strip().splitlines():
        return line.strip()
    return ""


def disabled_from_env() -> set[str]:
    """Plugin names listed in ``GPT_DISABLE_PLUGINS`` (comma-separated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    seen: set[str] = set()
    for ep in sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name
    ):
        # An editable install can list the same entry point twice.
        if ep.name in seen:
            continue
        seen.add(ep.name)
        yield ep


def load_plugins(*, entry_points: bool = True, disabled: Iterable[str] | None = None) -> Plugins:
    """Build a new plugin manager and load the installed plugins into it.

    :param entry_points: load the ``nanogpt`` entry points (turn off in tests that
        register their own plugins only).
    :param disabled: plugin names to block; defaults to ``GPT_DISABLE_PLUGINS``.
    """
    manager = pluggy.PluginManager("nanogpt")
    manager.add_hookspecs(hookspecs)
    plugins = Plugins(manager)
    blocked = disabled_from_env() if disabled is None else set(disabled)
    for name in blocked:
        manager.set_blocked(name)
    if not entry_points:
        return plugins
    for ep in _entry_points():
        if ep.name in blocked:
            continue
        dist = ep.dist.name if ep.dist else None
        version = ep.dist.version if ep.dist else None
        info = PluginInfo(name=ep.name, module=ep.value, distribution=dist, version=version)
        try:
            module, deprecations = _load_entry_point(ep)
        except Exception as exc:  # a broken third-party plugin must not stop the program
            plugins.broken.append(attrs.evolve(info, error=f"{type(exc).__name__}: {exc}"))
            continue
        plugins.register(module, name=ep.name, info=info, deprecations=deprecations)
    return plugins


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> tuple[Any, list[str]]:
    """Import an entry point; what it warned as :class:`PluginAPIDeprecation`, one message each.

    Other warnings are shown as Python would have shown them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", contract.PluginAPIDeprecation)
        module = ep.load()
    deprecations = []
    for warning in caught:
        if issubclass(warning.category, contract.PluginAPIDeprecation):
            deprecations.append(str(warning.message))
        else:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return module, deprecations
