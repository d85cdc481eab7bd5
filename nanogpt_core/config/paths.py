"""Relative paths in an experiment resolve against the folder of the file that set them.

While files are read (a file and the ones it ``extends``), and ``--set`` applied,
each leaf's origin is recorded (:data:`Origins`); :func:`resolve_paths` then makes
every path option absolute against its origin's folder: ``model.init_from`` and
each plugin option declared with ``option(..., path=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogpt_core.config.plugin_options import train_table_owner
from nanogpt_core.errors import PluginError
from nanogpt_core.plugins.options import path_fields

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins


# Where each value came from, so relative paths resolve against the folder of the
# file that wrote them: key path (("dataset", "path"), ("callbacks",)) -> folder.
# Only leaves are recorded; arrays are leaves, since they are replaced whole.
Origins = dict[tuple[str | int, ...], Path]


def set_origin(origins: Origins, key: tuple[str | int, ...], folder: Path) -> None:
    """Record that ``key`` was set in ``folder``, forgetting what it replaced below it."""
    for old in [k for k in origins if k[: len(key)] == key]:
        del origins[old]
    origins[key] = folder


def leaf_origins(
    table: dict[str, Any], folder: Path, prefix: tuple[str | int, ...] = ()
) -> Origins:
    """Every leaf of one file's ``table`` (arrays included), as set in ``folder``."""
    origins: Origins = {}
    for key, value in table.items():
        if isinstance(value, dict):
            origins.update(leaf_origins(value, folder, (*prefix, key)))
        else:
            origins[(*prefix, key)] = folder
    return origins


def origin_of(origins: Origins, key: tuple[str | int, ...]) -> Path:
    """The folder of the file (or ``--set``) that set ``key``: its nearest recorded ancestor."""
    for end in range(len(key), 0, -1):
        if key[:end] in origins:
            return origins[key[:end]]
    return Path.cwd()


def resolve_paths(data: dict[str, Any], origins: Origins, plugins: Plugins | None) -> None:
    """Make relative paths absolute against the folder of the file that set them, in place.

    ``model.init_from`` and every plugin option declared with ``option(..., path=True)``
    (known only when ``plugins`` is given); ``~`` is expanded. Values of the wrong
    type are left alone for the type check to report.
    """
    _resolve_keys(data.get("model"), ["init_from"], ("model",), origins)
    if plugins is None:
        return
    tables: list[tuple[Any, dict[str, Any], tuple[str | int, ...]]] = [
        (data.get("dataset"), plugins.datasets(), ("dataset",)),
        (data.get("tokenizer"), plugins.tokenizers(), ("tokenizer",)),
        (data.get("template"), plugins.templates(), ("template",)),
    ]
    if isinstance(data.get("callbacks"), list):
        callbacks = plugins.callbacks()
        tables += [(t, callbacks, ("callbacks", i)) for i, t in enumerate(data["callbacks"])]
    if isinstance(data.get("train"), dict):
        for name, table in data["train"].items():
            try:
                registration = train_table_owner(plugins, name)
            except PluginError:
                continue  # a name two plugins registered: the second pass reports it
            if isinstance(table, dict) and registration is not None:
                _resolve_keys(table, path_fields(registration.options), ("train", name), origins)
    for table, registry, key in tables:
        if isinstance(table, dict) and isinstance(table.get("plugin"), str):
            try:
                registration = registry.get(table["plugin"])
            except PluginError:
                continue  # a name two plugins registered: the second pass reports it
            if registration is not None:
                _resolve_keys(table, path_fields(registration.options), key, origins)
    _resolve_eval_paths(data.get("eval"), plugins, origins)


def _resolve_eval_paths(tables: Any, plugins: Plugins, origins: Origins) -> None:
    """Path options of ``[eval.<task>]`` tables, which name their plugin by their key."""
    if not isinstance(tables, dict):
        return
    registry = plugins.eval_tasks()
    for task, table in tables.items():
        try:
            registration = registry.get(task)
        except PluginError:
            continue
        if registration is not None:
            _resolve_keys(table, path_fields(registration.options), ("eval", task), origins)


def _resolve_keys(
    table: Any, names: list[str], prefix: tuple[str | int, ...], origins: Origins
) -> None:
    if not isinstance(table, dict):
        return
    for name in names:
        value = table.get(name)
        folder = origin_of(origins, (*prefix, name))
        if isinstance(value, str):
            table[name] = _resolve_path(value, folder)
        elif isinstance(value, list):
            table[name] = [_resolve_path(v, folder) if isinstance(v, str) else v for v in value]


def _resolve_path(value: str, folder: Path) -> str:
    if not value:
        return value  # "" is no path at all; the plugin's own check reports it
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)
