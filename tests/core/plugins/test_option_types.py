"""Every type an option may have goes TOML -> options -> config.json -> resume unchanged.

A third party's optimizer (AdamW with Lion-like ``betas: tuple[float, float]``)
declares one option of each supported type; a tiny run writes them to
``config.json`` and its checkpoint, and a longer rerun of the same file resumes
from both. Types that could not make that trip are refused when the plugin loads.
"""

from __future__ import annotations

import enum
import json
import pathlib
from typing import Literal, Optional

import attrs
import pytest
import torch

from nanogpt_core import hookimpl, option
from nanogpt_core.config.experiment_file import load_experiment
from nanogpt_core.errors import ConfigError
from nanogpt_core.plugins.registry import load_plugins
from nanogpt_core.train.resume import config_differences


class Mode(enum.Enum):
    """An enum option: written as its value."""

    FAST = "fast"
    CAREFUL = "careful"


@attrs.frozen(kw_only=True)
class Inner:
    """A nested table."""

    sizes: tuple[int, ...] = option((1,), "A nested variadic tuple.")


@attrs.frozen(kw_only=True)
class TypedOptions:
    """One option of every supported type."""

    betas: tuple[float, float] = option((0.9, 0.99), "Lion's betas.")
    steps: int = option(1, "An int.")
    scale: float = option(1.0, "A float.")
    on: bool = option(True, "A bool.")
    label: str = option("x", "A str.")
    cap: Optional[int] = option(None, "An optional int.")  # noqa: UP045 - the spelling under test
    limit: float | None = option(None, "An optional float.")
    widths: tuple[int, ...] = option((), "A variadic tuple.")
    names: list[str] = option(doc="A list.", factory=list)
    grid: list[list[float]] = option(doc="Nested lists.", factory=list)
    pairs: list[tuple[int, int]] = option(doc="Tuples in a list.", factory=list)
    weights: dict[str, float] = option(doc="A table of floats.", factory=dict)
    mode: Mode = option(Mode.FAST, "An enum.")
    where: pathlib.Path = option(pathlib.Path("."), "A path.")
    kind: Literal["a", "b"] = option("a", "A literal.")
    inner: Inner = option(doc="A nested table.", factory=Inner)


class TypedAdamW:
    """AdamW built with the ``betas`` option, as a Lion plugin would pass its own."""

    def __init__(self, options: TypedOptions) -> None:
        self.options = options

    def build(self, model, train, device_type):
        return torch.optim.AdamW(
            model.parameters(), lr=train.learning_rate, betas=self.options.betas
        )


class Typed:
    @hookimpl
    def register_optimizers(self, register):
        register("typed", TypedAdamW, options=TypedOptions)


TYPED_TABLE = """
[train.typed]
betas = [0.8, 0.95]
steps = 3
scale = 2
on = false
label = "y"
cap = 7
widths = [1, 2, 3]
names = ["a", "b"]
grid = [[1, 2.5], [3.0]]
pairs = [[1, 2], [3, 4]]
weights = {{ a = 1, b = 0.5 }}
mode = "careful"
where = "{where}"
kind = "b"
inner = {{ sizes = [4, 5] }}
"""
FOUR_STEPS = ["train.steps_per_epoch=4", "train.eval_every=4", "train.eval_batches=1"]


def typed_plugins():
    plugins = load_plugins(disabled=())
    assert plugins.register(Typed(), name="typed"), plugins.broken
    return plugins


def test_every_option_type_is_read_written_and_resumed_unchanged(
    tiny_char_experiment, session_data_dir, tmp_path, train_experiment, capsys
):
    plugins = typed_plugins()
    path = tiny_char_experiment(extra=TYPED_TABLE.format(where=tmp_path))
    overrides = [*FOUR_STEPS, "train.optimizer=typed"]
    config = load_experiment(path, overrides, plugins)
    options = config.train.optimizer_options
    assert options.betas == (0.8, 0.95) and options.widths == (1, 2, 3)
    assert options.pairs == [(1, 2), (3, 4)] and options.inner == Inner(sizes=(4, 5))
    assert (options.mode, options.where, options.scale) == (Mode.CAREFUL, tmp_path, 2.0)
    assert options.weights == {"a": 1.0, "b": 0.5} and options.grid == [[1.0, 2.5], [3.0]]

    results = tmp_path / "r"
    train_experiment(path, session_data_dir, results, overrides, plugins)
    saved = json.loads((results / "tiny" / "config.json").read_text())
    assert saved["train"]["typed"] == {
        "betas": [0.8, 0.95],
        "steps": 3,
        "scale": 2.0,
        "on": False,
        "label": "y",
        "cap": 7,
        "limit": None,
        "widths": [1, 2, 3],
        "names": ["a", "b"],
        "grid": [[1.0, 2.5], [3.0]],
        "pairs": [[1, 2], [3, 4]],
        "weights": {"a": 1.0, "b": 0.5},
        "mode": "careful",
        "where": str(tmp_path),
        "kind": "b",
        "inner": {"sizes": [4, 5]},
    }
    # The same file, trained longer: config.json and the checkpoint's copy both agree.
    longer = [*overrides, "train.epochs=2"]
    train_experiment(path, session_data_dir, results, longer, plugins)
    assert "resuming from step 4" in capsys.readouterr().out
    records = (results / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records][-1] == 8


def test_gpt_plugins_shows_every_default_as_the_toml_would_write_it():
    from click.testing import CliRunner

    from nanogpt_core.cli import make_cli

    result = CliRunner().invoke(make_cli(typed_plugins()), ["plugins"])
    assert result.exit_code == 0, result.output
    shown = result.output.splitlines()
    assert "    betas (default [0.9, 0.99]): Lion's betas." in shown
    assert '    mode (default "fast"): An enum.' in shown
    assert '    where (default "."): A path.' in shown
    assert '    inner (default {"sizes": [1]}): A nested table.' in shown


def test_a_changed_tuple_option_is_still_a_difference(tmp_path):
    saved = {"train": {"typed": {"betas": [0.9, 0.99]}}}
    assert config_differences(saved, {"train": {"typed": {"betas": (0.9, 0.99)}}}) == []
    assert config_differences(saved, {"train": {"typed": {"betas": (0.9, 0.98)}}}) == [
        "train.typed.betas: [0.9, 0.99] there, [0.9, 0.98] now"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[0.9]", "train.typed.betas: expected an array of 2 values, got 1"),
        ('"ab"', 'train.typed.betas: expected an array, got "ab"'),
        ("[0.9, true]", "train.typed.betas[1]: expected a float, got true"),
    ],
)
def test_a_bad_tuple_is_one_line_naming_the_key(write_toml, value, message):
    path = write_toml(
        "x.toml",
        f'[dataset]\nplugin = "shakespeare"\n[train]\noptimizer = "typed"\n'
        f"[train.typed]\nbetas = {value}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_experiment(path, (), typed_plugins())
    assert caught.value.problems == [f"{path}: {message}"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mode", '"slow"', 'expected one of "fast", "careful", got "slow"'),
        ("kind", '"c"', 'expected one of "a", "b", got "c"'),
        ("where", "3", "expected a path (a string), got 3"),
        ("weights", '{ a = "x" }', 'weights.a: expected a float, got "x"'),
        ("inner", "{ sizes = [1.5] }", "inner.sizes[0]: expected an integer, got 1.5"),
    ],
)
def test_bad_values_of_the_other_types_are_one_line_each(write_toml, key, value, message):
    path = write_toml(
        "x.toml",
        f'[dataset]\nplugin = "shakespeare"\n[train]\noptimizer = "typed"\n'
        f"[train.typed]\n{key} = {value}\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_experiment(path, (), typed_plugins())
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}: train.typed.{key}")
    assert problem.endswith(message)


class Opaque:
    """A class of the plugin's own: cattrs cannot read it from TOML nor write it to JSON."""


@attrs.frozen(kw_only=True)
class WithSet:
    tags: set[str] = option(doc="A set.", factory=set)


@attrs.frozen(kw_only=True)
class WithClass:
    thing: Opaque | None = option(None, "A custom class.")


@attrs.frozen(kw_only=True)
class WithUnion:
    size: int | str = option(1, "Two types at once.")


@attrs.frozen(kw_only=True)
class WithNestedSet:
    groups: dict[str, list[frozenset[int]]] = option(doc="Deep inside.", factory=dict)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (WithSet, "option 'tags' of type set[str]: set[str] cannot be written"),
        (WithClass, "option 'thing' of type Opaque | None: Opaque cannot be written"),
        (WithUnion, "option 'size' of type int | str: int | str is a union"),
        (WithNestedSet, "option 'groups' of type dict[str, list[frozenset[int]]]: frozenset"),
    ],
)
def test_an_option_type_that_cannot_round_trip_is_refused_at_load(options, problem):
    class Unreadable:
        @hookimpl
        def register_callbacks(self, register):
            register("odd", lambda o: None, options=options)

    plugins = load_plugins(disabled=())
    assert not plugins.register(Unreadable(), name="unreadable")
    (broken,) = plugins.broken
    assert broken.error.startswith(f"plugin 'unreadable': callback 'odd': {problem}")
    assert "\n" not in broken.error


def test_the_built_in_plugins_options_all_round_trip(installed_plugins):
    # Nothing installed was refused by the check: every built-in type is supported.
    assert installed_plugins.broken == []
