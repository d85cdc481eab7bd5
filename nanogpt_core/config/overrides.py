"""``--set KEY=VALUE`` overrides, applied to an experiment's raw TOML table.

A key is a dotted path; ``name[i]`` picks an array element by position, and a
plain name under an array of tables (``callbacks.checkpoint``) picks the table
whose ``plugin`` is that name. A value is read as a TOML literal, and a bare
word as a string.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from nanogpt_core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

# One dotted part of a key: a name, optionally with an array position (`callbacks[0]`).
_KEY_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\[(\d+)\])?$")


def parse_value(text: str) -> Any:
    """Read an override's value as a TOML literal; a bare word is a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> tuple[str | int, ...]:
    """Apply one ``--set key.path=value`` to the raw experiment table, in place.

    ``callbacks[0].every_steps`` picks a callback by position and
    ``callbacks.checkpoint.every_steps`` by plugin name.

    :returns: the key path that was set, with array positions as ints.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            [f"--set {assignment}: expected KEY=VALUE, e.g. train.learning_rate=3e-4"]
        )
    parts = key.strip().split(".")
    node: Any = data
    where: list[str | int] = []
    for i, part in enumerate(parts):
        match = _KEY_PART.match(part)
        if not match:
            raise ConfigError([f"--set {assignment}: {part!r} is not a key"])
        name, index = match.group(1), match.group(2)
        last = i == len(parts) - 1
        if isinstance(node, list):
            # `callbacks.checkpoint`: the table in the array whose plugin is that name.
            tables = [t for t in node if isinstance(t, dict) and t.get("plugin") == name]
            if not tables:
                raise ConfigError([f"--set {assignment}: no table with plugin = {name!r}"])
            where.append(next(j for j, t in enumerate(node) if t is tables[0]))
            node = tables[0]
            if last:
                raise ConfigError([f"--set {assignment}: name a key inside the {name!r} table"])
            continue
        if not isinstance(node, dict):
            raise ConfigError([f"--set {assignment}: {'.'.join(parts[:i])} is not a table"])
        if index is not None:
            array = node.get(name)
            if not isinstance(array, list) or int(index) >= len(array):
                raise ConfigError([f"--set {assignment}: {name}[{index}] does not exist"])
            where.extend((name, int(index)))
            if last:
                array[int(index)] = parse_value(text)
            node = array[int(index)]
        elif last:
            where.append(name)
            node[name] = parse_value(text)
        else:
            where.append(name)
            node = node.setdefault(name, {})
    return tuple(where)
