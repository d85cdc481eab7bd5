"""Rebuilding a tokenizer or template from the description stored with data and checkpoints.

``meta.json`` and every checkpoint keep a tokenizer's (and a template's)
``description()``; :func:`rebuild_from_description` finds the registration its
``kind`` names and asks that class's ``from_description`` to rebuild it, so
sampling and export need no original files.
"""

from __future__ import annotations

from typing import Any

from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.plugins.registry import Plugins, load_plugins


def rebuild_from_description(
    kind: str, description: dict[str, Any], plugins: Plugins | None = None
) -> Any:
    """Rebuild a ``kind`` (tokenizer, template) from its ``description()``, via its registry.

    The description's ``kind`` key names the registration; its factory's
    ``from_description`` classmethod does the rebuilding. Every failure is one line.

    :param plugins: where to look the name up; the installed plugins when None.
    """
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
