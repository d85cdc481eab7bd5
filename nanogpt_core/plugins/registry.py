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
name are a *conflict*: only what uses that name fails, naming both.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from nanogpt_core.errors import PluginError
from nanogpt_core.plugins import hookspecs
from nanogpt_core.plugins.option_types import fields_problem
from nanogpt_core.plugins.options import suggest
from nanogpt_core.train.callbacks import CALLBACK_HOOKS, CALLBACK_METHODS

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


def check_callback_class(factory: Any, name: str, plugin: str) -> None:
    """Refuse a callback class with a method named like a hook that does not exist.

    ``on_step_ended`` would otherwise never be called, silently.
    """
    for attr in dir(factory):
        if attr.startswith("on_") and attr not in CALLBACK_HOOKS:
            raise PluginError(
                f"plugin {plugin!r}: callback {name!r}: method {attr!r} matches no hook"
                f"{suggest(attr, CALLBACK_HOOKS)}; hooks are {', '.join(CALLBACK_HOOKS)}"
            )


def check_callback(callback: Any, name: str, plugin: str) -> None:
    """What a callback factory returned has every method the trainer calls."""
    check_callback_class(type(callback), name, plugin)
    missing = [m for m in CALLBACK_METHODS if not callable(getattr(callback, m, None))]
    if missing:
        raise PluginError(
            f"plugin {plugin!r}: callback {name!r}: the factory returned "
            f"{type(callback).__name__}, which lacks {', '.join(missing)}; "
            "subclass nanogpt_core.Callback"
        )


class Plugins:
    """A plugin manager and the datasets, callbacks, optimizers, ... and commands it provides."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self.loaded: list[PluginInfo] = []
        self.broken: list[PluginInfo] = []
        self._registered: dict[str, list[Registration]] = {}
        self._registries: dict[str, Registry] | None = None

    # -- loading ---------------------------------------------------------------

    def register(self, plugin: object, name: str, info: PluginInfo | None = None) -> bool:
        """Register a plugin object (entry points, tests, embedding applications).

        Returns whether it was accepted. A plugin with a misspelled hook, wrong
        argument names, a wrapper on a ``register_*`` hook, or a ``register_*``
        hook that fails or registers something invalid is refused: it is
        unregistered and recorded in :attr:`broken`.
        """
        info = info or PluginInfo(name=name, module=getattr(plugin, "__name__", repr(plugin)))
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
        return True

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
        """
        failures: list[str] = []
        hook = self.manager.hook.register_commands
        for impl in _ordered(hook.get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                failures.append(
                    f"plugin {impl.plugin_name!r}: register_commands cannot be a wrapper; "
                    "its commands were not added"
                )
                continue
            try:
                impl.function(**{arg: cli for arg in impl.argnames})
            except Exception as exc:
                failures.append(
                    f"plugin {impl.plugin_name!r} failed in register_commands: "
                    f"{type(exc).__name__}: {exc}"
                )
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


def rebuild_from_description(
    kind: str, description: dict[str, Any], plugins: Plugins | None = None
) -> Any:
    """Rebuild a ``kind`` (tokenizer, template) from its ``description()``, via its registry.

    The description's ``kind`` key names the registration; its factory's
    ``from_description`` classmethod does the rebuilding. Every failure is one line.

    :param plugins: where to look the name up; the installed plugins when None.
    """
    from nanogpt_core.errors import NanoGPTError, PluginFault

    name = description.get("kind") if isinstance(description, dict) else None
    if not isinstance(name, str) or not name:
        raise NanoGPTError(f"the {kind} description has no 'kind'; it is damaged")
    if plugins is None:
        plugins = load_plugins()
    registry = plugins.registry(kind)
    registration = registry.get(name)
    if registration is None:
        installed = ", ".join(sorted(registry)) or "none"
        raise NanoGPTError(
            f"{kind} {name!r} is not installed (installed: {installed}); "
            "install the plugin that provides it"
        )
    rebuild = getattr(registration.factory, "from_description", None)
    if not callable(rebuild):
        raise NanoGPTError(
            f"plugin {registration.plugin!r}: {kind} {name!r} has no from_description "
            "classmethod, so it cannot be rebuilt from a checkpoint or meta.json"
        )
    try:
        return rebuild(description)
    except NanoGPTError:
        raise
    except Exception as exc:
        raise PluginFault(
            f"plugin {registration.plugin!r}: {kind} {name!r} failed in from_description: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


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
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not stop the program
            plugins.broken.append(attrs.evolve(info, error=f"{type(exc).__name__}: {exc}"))
            continue
        plugins.register(module, name=ep.name, info=info)
    return plugins
