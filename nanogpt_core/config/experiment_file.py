"""Reading an experiment file: TOML in, a checked :class:`ExperimentConfig` out.

An experiment file names a dataset plugin, the model shape, the training recipe
and the callbacks to enable; it may ``extends`` a base file, which it overrides
table by table. Loading happens in two passes: the core sections are structured
first (unknown keys are refused), with each plugin's table kept as a plain dict;
then, when the plugins are given, each of those tables is structured into the
options class its plugin registered (:mod:`nanogpt_core.config.plugin_options`). Every
problem found is reported as ``file: key.path: message``, one line each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nanogpt_core.config.experiment import ExperimentConfig, TrainConfig
from nanogpt_core.config.overrides import apply_override
from nanogpt_core.config.paths import Origins, leaf_origins, resolve_paths, set_origin
from nanogpt_core.config.plugin_options import resolve_plugins, unselected
from nanogpt_core.errors import ConfigError
from nanogpt_core.plugins.options import OptionProblems, structure

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from nanogpt_core.plugins.registry import Plugins


def read_toml(path: Path, shown: str) -> dict[str, Any]:
    """Parse one TOML file; syntax errors name the file, line and column."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{shown}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{shown}: is a folder, expected a .toml experiment file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{shown}: invalid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{shown}: not UTF-8 text: {exc.reason}"]) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge two TOML tables; ``override`` wins, tables merge, arrays are replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_experiment_file(
    path: Path, shown: str | None = None, _chain: tuple[Path, ...] = ()
) -> dict:
    """Read an experiment file and the files it ``extends``, merged into one table."""
    return _read_with_origins(path, shown or str(path), _chain)[0]


def _read_with_origins(
    path: Path, shown: str, chain: tuple[Path, ...]
) -> tuple[dict[str, Any], Origins]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise ConfigError([f"{shown}: extends: cycle {cycle}"])
    data = read_toml(path, shown)
    parent = data.pop("extends", None)
    # abspath also folds the `..` of `extends = "../base.toml"` out of the folder.
    origins = leaf_origins(data, Path(os.path.abspath(path.parent)))
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise ConfigError([f"{shown}: extends: expected a file name (string), got {parent!r}"])
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ConfigError([f"{shown}: extends: file not found: {parent_path}"])
    base, merged_origins = _read_with_origins(parent_path, str(parent_path), (*chain, resolved))
    # `abstract` marks one file as a base, and `name` one experiment's results
    # folder: neither is inherited (a file's name defaults to its own stem).
    base.pop("abstract", None)
    base.pop("name", None)
    for key, folder in origins.items():
        set_origin(merged_origins, key, folder)
    return deep_merge(base, data), merged_origins


def _split_plugin_table(table: Any) -> Any:
    """``{"plugin": "x", "a": 1}`` -> ``{"plugin": "x", "options": {"a": 1}}``."""
    if not isinstance(table, dict):
        return table
    options = {k: v for k, v in table.items() if k != "plugin"}
    split: dict[str, Any] = {"options": options}
    if "plugin" in table:
        split["plugin"] = table["plugin"]
    return split


def _split_train_tables(train: Any) -> dict[str, Any]:
    """Take the ``[train.<name>]`` tables (optimizer and schedule options) out of ``[train]``.

    A table under a key of ``[train]`` itself (``train.batch_size = {}``) stays, for
    the type check to report.
    """
    if not isinstance(train, dict):
        return {}
    keys = {field.name for field in attrs.fields(TrainConfig)}
    tables = {k: v for k, v in train.items() if isinstance(v, dict) and k not in keys}
    for name in tables:
        del train[name]
    return tables


def load_experiment(
    path: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    plugins: Plugins | None = None,
    warnings: list[str] | None = None,
) -> ExperimentConfig:
    """Load an experiment file, apply ``--set`` overrides and check every option.

    :param plugins: when given, each plugin table is checked against the options
        class its plugin registered (the second pass); without it options stay dicts.
    :param warnings: where a line is appended for each option that nothing uses
        (``[train.muon]`` with adamw, ``model.rope_theta`` with learned
        positions): such an option is checked, then left out of the experiment.
    :raises ConfigError: listing every problem, one line each.
    """
    shown = str(path)
    path = Path(path)
    data, origins = _read_with_origins(path, shown, ())
    for assignment in overrides:
        try:
            key = apply_override(data, assignment)
        except ConfigError as exc:
            raise ConfigError([f"{shown}: {p}" for p in exc.problems]) from None
        # A path given on the command line means what it means in the shell.
        set_origin(origins, key, Path.cwd())
    resolve_paths(data, origins, plugins)
    data.setdefault("name", path.stem)
    for table in ("dataset", "tokenizer", "template"):
        if isinstance(data.get(table), dict):
            data[table] = _split_plugin_table(data[table])
    if isinstance(data.get("callbacks"), list):
        data["callbacks"] = [_split_plugin_table(t) for t in data["callbacks"]]
    train_tables = _split_train_tables(data.get("train"))
    try:
        config = structure(data, ExperimentConfig)
    except OptionProblems as exc:
        raise ConfigError([f"{shown}: {_tidy(p)}" for p in exc.problems]) from None
    if train_tables:
        config = attrs.evolve(config, train=attrs.evolve(config.train, plugin_options=train_tables))
    model = config.model
    if model.rope_theta is not None and model.position != "rope":
        if warnings is not None:
            line = unselected("model.rope_theta", "model.position", "rope", model.position)
            warnings.append(f"{shown}: {line}")
        config = attrs.evolve(config, model=attrs.evolve(model, rope_theta=None))
    if plugins is not None:
        config = resolve_plugins(config, plugins, shown, warnings)
    return config


def _tidy(problem: str) -> str:
    # The split of plugin tables is ours, not the user's: hide ".options" in paths.
    return problem.replace(".options.", ".").replace(".options:", ":")
