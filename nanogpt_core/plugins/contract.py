"""Load-time checks of a plugin against the contract of the plugin API.

What a plugin declares and names is checked once, when it loads, so that a
mistake its author could not see is said in one line naming the plugin:

- :func:`api_mismatch`: the API versions the module declares in
  ``NANOGPT_API`` (a PEP 440 specifier such as ``">=1.0,<2"``) against
  :data:`~nanogpt_core.plugins.hookspecs.API_VERSION`. A mismatch is a warning:
  the plugin still loads, since most code written for an older API still runs.
- :func:`unknown_hooks`: ``@hookimpl`` functions whose name is no hook (pluggy
  would refuse them with a message of several lines), with a did-you-mean.
- :func:`hook_warnings`: a plugin that implements no hook at all (it registers
  nothing, silently) and unmarked functions named like a hook.
- :func:`shadowed_commands`: plugin commands that would replace a built-in one.
- :class:`PluginAPIDeprecation`: what a deprecated way of writing a plugin
  warns with while the plugin is imported; the loader turns it into one line
  naming the plugin.
- :func:`check_callback_class`, :func:`check_callback`: a callback has the
  methods the trainer calls, and none named like a hook that does not exist.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from nanogpt_core.errors import PluginError
from nanogpt_core.plugins import hookspecs
from nanogpt_core.plugins.hookspecs import API_VERSION
from nanogpt_core.plugins.options import suggest
from nanogpt_core.train.callbacks import CALLBACK_HOOKS, CALLBACK_METHODS

DECLARATION = "NANOGPT_API"


class PluginAPIDeprecation(FutureWarning):
    """A documented way of writing a plugin that a later major API version removes.

    Its message says what the plugin does, what to change, and the API version
    that removes it; the loader prefixes the plugin's name. (A FutureWarning, so
    Python shows it by default where the loader does not catch it.)
    """


HOOK_NAMES = sorted(
    name
    for name, value in vars(hookspecs).items()
    if callable(value) and hasattr(value, "nanogpt_spec")
)


def did_you_mean(word: str, candidates: list[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word``, or None when none is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    return close[0] if close else None


def api_mismatch(plugin: object, origin: str) -> str | None:
    """One warning line when ``plugin`` declares API versions that exclude ours, else None.

    A declaration that is not a string or not a PEP 440 specifier is reported the
    same way: the plugin's author meant to say something we cannot read.
    """
    declared = getattr(plugin, DECLARATION, None)
    if declared is None:
        return None
    fix = f'; declare a PEP 440 specifier such as {DECLARATION} = ">=1.0,<2"'
    if not isinstance(declared, str):
        return f"{origin}: {DECLARATION} = {declared!r} is not a string{fix}"
    try:
        supported = SpecifierSet(declared)
    except InvalidSpecifier:
        return f"{origin}: {DECLARATION} = {declared!r} is not a version specifier{fix}"
    if supported.contains(API_VERSION, prereleases=True):
        return None
    return (
        f"{origin} declares {DECLARATION} = {declared!r}, which excludes this plugin API "
        f"({API_VERSION}); it is loaded anyway: update the plugin, or nanogpt"
    )


def _own_functions(plugin: object) -> dict[str, Any]:
    """The public callables a plugin defines, by name (a module's imports left out)."""
    module_name = plugin.__name__ if inspect.ismodule(plugin) else None
    found = {}
    for name in dir(plugin):
        if name.startswith("_"):
            continue
        value = getattr(plugin, name, None)
        if not (inspect.isfunction(value) or inspect.ismethod(value)):
            continue
        if module_name is not None and getattr(value, "__module__", None) != module_name:
            continue
        found[name] = value
    return found


def _marked(manager: pluggy.PluginManager, plugin: object, name: str) -> dict[str, Any] | None:
    """The ``@hookimpl`` options of ``plugin.name``, or None when it is not marked."""
    opts = manager.parse_hookimpl_opts(plugin, name)
    return dict(opts) if opts is not None else None


def unknown_hooks(manager: pluggy.PluginManager, plugin: object) -> str | None:
    """One line (the plugin's error) for its ``@hookimpl`` functions named like no hook, or None."""
    problems = []
    # Every attribute, as pluggy registers them: a hook imported from a submodule counts.
    for name in dir(plugin):
        opts = _marked(manager, plugin, name)
        if opts is None:
            continue
        hook = opts.get("specname") or name
        if hook in HOOK_NAMES:
            continue
        close = did_you_mean(hook, HOOK_NAMES)
        hint = f' (did you mean "{close}"?)' if close else ""
        problems.append(f"@hookimpl {hook!r} matches no hook{hint}")
    if not problems:
        return None
    return f"{'; '.join(problems)}; hooks are {', '.join(HOOK_NAMES)}"


def hook_warnings(manager: pluggy.PluginManager, plugin: object, origin: str) -> list[str]:
    """Warning lines for a registered plugin whose hooks would silently never be called.

    An unmarked function named exactly like a hook, or close to one
    (``register_optimiser``), gets a line each; a plugin with no ``@hookimpl``
    at all and no such function gets one line saying it registers nothing.
    """
    lines = []
    for name in _own_functions(plugin):
        if _marked(manager, plugin, name) is not None:
            continue
        close = did_you_mean(name, HOOK_NAMES, cutoff=0.85)
        if close == name:
            lines.append(
                f"{origin}: {name} is not marked @nanogpt_core.hookimpl, so it is never called"
            )
        elif close is not None:
            lines.append(
                f'{origin}: {name} matches no hook (did you mean "{close}"?) and is not '
                "marked @nanogpt_core.hookimpl, so it is never called"
            )
    # Registered hooks, its own or imported from a submodule; called after registration.
    if not manager.get_hookcallers(plugin) and not lines:
        lines.append(
            f"{origin} implements no hook, so it registers nothing: mark its hook "
            f"functions with @nanogpt_core.hookimpl (hooks are {', '.join(HOOK_NAMES)})"
        )
    return lines


def shadowed_commands(
    builtin: dict[str, Any], commands: dict[str, Any], origin: str
) -> tuple[list[str], list[str]]:
    """The built-in command names a plugin's hook replaced in ``commands``, and a line each.

    :param builtin: the group's commands before the plugin's hook ran.
    :param commands: the group's commands after it (restored by the caller).
    """
    names = [name for name, command in builtin.items() if commands.get(name) is not command]
    lines = [
        f"{origin}: command {name!r} is a built-in command; the plugin's was not added (rename it)"
        for name in names
    ]
    return names, lines


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
