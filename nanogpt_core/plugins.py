"""Finding plugins and collecting what they register.

:func:`load_plugins` builds a fresh pluggy manager, loads every entry point of the
``nanogpt`` group one at a time (so one broken plugin becomes a warning instead of
stopping the program) and returns a :class:`Plugins` object from which the rest of
the core asks for datasets, callbacks and commands. There is no module-global
manager: each call returns a new, independent one.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pluggy

from nanogpt_core import hookspecs
from nanogpt_core.errors import PluginError

ENTRY_POINT_GROUP = "nanogpt"
DISABLE_ENV = "GPT_DISABLE_PLUGINS"


@attrs.frozen
class PluginInfo:
    """One plugin that was found: where it came from and, if it failed, why."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None


@attrs.frozen
class Registration:
    """A dataset or callback a plugin registered through a ``register_*`` hook."""

    kind: str
    name: str
    factory: Callable[[Any], Any]
    options: type
    plugin: str
    description: str = ""


@attrs.frozen(kw_only=True)
class NoOptions:
    """The options class of a plugin that takes none."""


class Plugins:
    """A plugin manager and the datasets, callbacks and commands its plugins provide."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self.loaded: list[PluginInfo] = []
        self.broken: list[PluginInfo] = []
        self._registrations: dict[str, dict[str, Registration]] | None = None

    def register(self, plugin: object, name: str, info: PluginInfo | None = None) -> None:
        """Register a plugin object in-process (tests and embedding applications).

        A plugin with misspelled hook names is refused: it is unregistered and
        recorded in :attr:`broken` rather than silently doing nothing.
        """
        self.manager.register(plugin, name=name)
        info = info or PluginInfo(name=name, module=getattr(plugin, "__name__", repr(plugin)))
        try:
            self.manager.check_pending()
        except pluggy.PluginValidationError as exc:
            self.manager.unregister(name=name)
            self.broken.append(attrs.evolve(info, error=f"{exc}"))
            return
        self.loaded.append(info)
        self._registrations = None

    def datasets(self) -> dict[str, Registration]:
        """Every registered dataset, by name."""
        return self._collect()["dataset"]

    def callbacks(self) -> dict[str, Registration]:
        """Every registered callback, by name."""
        return self._collect()["callback"]

    def add_commands(self, cli: Any) -> None:
        """Let plugins add subcommands to the ``gpt`` click group."""
        self.manager.hook.register_commands(cli=cli)

    def _collect(self) -> dict[str, dict[str, Registration]]:
        if self._registrations is None:
            self._registrations = {
                "dataset": self._call_register_hook("dataset", self.manager.hook.register_datasets),
                "callback": self._call_register_hook(
                    "callback", self.manager.hook.register_callbacks
                ),
            }
        return self._registrations

    def _call_register_hook(self, kind: str, hook: Any) -> dict[str, Registration]:
        found: dict[str, Registration] = {}
        # Call each implementation ourselves, in registration order, so that every
        # registration knows which plugin made it (pluggy's own call does not say).
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(
                name: str,
                factory: Callable[[Any], Any],
                options: type | None = None,
                description: str = "",
                _plugin: str = plugin_name,
            ) -> None:
                options = options or NoOptions
                if not attrs.has(options):
                    raise PluginError(
                        f"plugin {_plugin!r}: {kind} {name!r}: options must be an attrs class, "
                        f"got {options!r}"
                    )
                if name in found:
                    raise PluginError(
                        f"{kind} {name!r} is registered by both plugin {found[name].plugin!r} "
                        f"and plugin {_plugin!r}; uninstall or disable one "
                        f"({DISABLE_ENV}={_plugin})"
                    )
                found[name] = Registration(
                    kind=kind,
                    name=name,
                    factory=factory,
                    options=options,
                    plugin=_plugin,
                    description=description or first_line(factory.__doc__),
                )

            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin_name!r} failed in {hook.name}: {type(exc).__name__}: {exc}"
                ) from exc
        return found


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
