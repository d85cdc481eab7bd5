"""The plugin manager: registration hooks, guarded loading, blocking, misspelled hooks."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import attrs
import click
import pytest
from click.testing import CliRunner

from nanogpt_core import Callback, hookimpl, option
from nanogpt_core.cli import make_cli
from nanogpt_core.errors import PluginError
from nanogpt_core.plugins import hookspecs
from nanogpt_core.plugins.registry import NoOptions, load_plugins

REPO = Path(__file__).resolve().parents[3]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@attrs.frozen(kw_only=True)
class WordsOptions:
    """Options of the toy dataset."""

    words: int = option(10, "How many words.")


class ToyDatasets:
    """Registers one dataset."""

    @hookimpl
    def register_datasets(self, register):
        register("words", lambda options: ("words", options.words), options=WordsOptions)


class ToyCallbacks:
    """Registers one callback without options."""

    @hookimpl
    def register_callbacks(self, register):
        register("noop", lambda options: Callback(), description="Does nothing.")


class SameDatasetName:
    """Registers a dataset under a name ToyDatasets already uses."""

    @hookimpl
    def register_datasets(self, register):
        register("words", lambda options: None, options=WordsOptions)


def fresh():
    return load_plugins(entry_points=False, disabled=())


def test_register_datasets_records_name_options_factory_and_plugin():
    plugins = fresh()
    plugins.register(ToyDatasets(), name="toy")
    registration = plugins.datasets()["words"]
    assert registration.plugin == "toy"
    assert registration.options is WordsOptions
    assert registration.factory(WordsOptions(words=3)) == ("words", 3)
    assert plugins.callbacks() == {}


def test_register_callbacks_defaults_to_no_options_and_keeps_description():
    plugins = fresh()
    plugins.register(ToyCallbacks(), name="toy-callbacks")
    registration = plugins.callbacks()["noop"]
    assert registration.options is NoOptions
    assert registration.description == "Does nothing."
    assert isinstance(registration.factory(NoOptions()), Callback)


def test_duplicate_name_is_an_error_naming_both_plugins_when_used():
    plugins = fresh()
    plugins.register(ToyDatasets(), name="first")
    plugins.register(SameDatasetName(), name="second")
    with pytest.raises(
        PluginError, match=r"'words' is registered by both plugin 'first' and plugin 'second'"
    ):
        plugins.datasets()["words"]


def test_options_must_be_an_attrs_class():
    class BadOptions:
        @hookimpl
        def register_datasets(self, register):
            register("bad", lambda o: None, options=dict)

    plugins = fresh()
    assert not plugins.register(BadOptions(), name="bad")
    assert "options must be an attrs class" in plugins.broken[0].error
    assert "bad" not in plugins.datasets()


def test_register_commands_adds_a_gpt_subcommand():
    class Hello:
        @hookimpl
        def register_commands(self, cli):
            @cli.command()
            @click.argument("who")
            def hello(who):
                """Say hello."""
                click.echo(f"hello {who}")

    plugins = fresh()
    plugins.register(Hello(), name="hello")
    result = CliRunner().invoke(make_cli(plugins), ["hello", "world"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello world\n"


def test_misspelled_hook_is_refused_by_check_pending():
    class Misspelled:
        @hookimpl
        def register_dataset(self, register):  # missing "s"
            register("x", lambda o: None)

    plugins = fresh()
    plugins.register(Misspelled(), name="typo")
    plugins.register(ToyDatasets(), name="toy")
    assert [b.name for b in plugins.broken] == ["typo"]
    assert "register_dataset" in plugins.broken[0].error
    assert set(plugins.datasets()) == {"words"}


def test_hook_failure_names_the_plugin():
    class Crashes:
        @hookimpl
        def register_callbacks(self, register):
            raise RuntimeError("boom")

    plugins = fresh()
    plugins.register(Crashes(), name="crashy")
    assert plugins.broken[0].error == (
        "plugin 'crashy' failed in register_callbacks: RuntimeError: boom"
    )
    assert plugins.callbacks() == {}


def test_broken_entry_point_becomes_a_warning(monkeypatch):
    good = importlib.metadata.EntryPoint("toy", "nanogpt_plugins.datasets.shakespeare", "nanogpt")
    broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "nanogpt")
    monkeypatch.setattr("nanogpt_core.plugins.registry._entry_points", lambda: [broken, good])
    plugins = load_plugins(disabled=())
    assert [p.name for p in plugins.broken] == ["broken"]
    assert "ModuleNotFoundError" in plugins.broken[0].error
    assert [p.name for p in plugins.loaded] == ["toy"]


def builtin_entry_points() -> dict[str, str]:
    """The built-in plugins as pyproject.toml declares them."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"]["entry-points"]["nanogpt"]


def test_gpt_disable_plugins_blocks_by_name(monkeypatch):
    assert "shakespeare" in load_plugins().datasets()
    monkeypatch.setenv("GPT_DISABLE_PLUGINS", "shakespeare, other")
    plugins = load_plugins()
    assert "shakespeare" not in {p.name for p in plugins.loaded}
    assert "shakespeare" not in plugins.datasets()
    assert set(builtin_entry_points()) - {"shakespeare"} <= {p.name for p in plugins.loaded}


def test_builtin_plugins_come_from_entry_points(installed_plugins):
    infos = {p.name: p for p in installed_plugins.loaded}
    for name, module in builtin_entry_points().items():
        assert infos[name].distribution == "nanogpt"
        assert infos[name].module == module
        assert module.startswith("nanogpt_plugins.")
    assert installed_plugins.broken == []
    assert "shakespeare" in installed_plugins.datasets()


def test_core_never_imports_builtin_plugins_by_name():
    for path in (REPO / "nanogpt_core").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("nanogpt_plugins"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("nanogpt_plugins") for a in node.names), path


def hook_names() -> list[str]:
    return sorted(
        name
        for name in dir(hookspecs)
        if name.startswith("register_") and callable(getattr(hookspecs, name))
    )


# The page of the documentation that describes hooks, callbacks and their state.
PLUGIN_DOCS = REPO / "docs" / "plugins.md"


def test_every_hook_is_documented_in_the_docs():
    page = PLUGIN_DOCS.read_text()
    for name in hook_names():
        assert re.search(rf"^### `{name}\(", page, re.MULTILINE), (
            f"{PLUGIN_DOCS.name} lacks a heading for {name}"
        )
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"


def test_every_hook_has_a_test():
    tests = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    for name in hook_names():
        assert re.search(rf"def test_{name}\w*\(", tests), f"no test named test_{name}..."


def test_every_state_field_run_path_and_callback_hook_is_documented():
    from nanogpt_core.train.callbacks import CALLBACK_HOOKS, RunPaths, TrainerState

    page = PLUGIN_DOCS.read_text()
    state_fields = page[page.index("`TrainerState` fields:") :].split("\n\n")[1]
    for field in attrs.fields(TrainerState):
        if not field.name.startswith("_"):
            assert f"| `{field.name}` |" in state_fields, (
                f"TrainerState.{field.name} is not in {PLUGIN_DOCS.name}"
            )
    run_paths = page[page.index("`RunPaths` fields:") :][:600]
    names = ["root"] + [n for n, v in vars(RunPaths).items() if isinstance(v, property)]
    for name in names:
        assert f"`{name}" in run_paths, f"RunPaths.{name} is not in {PLUGIN_DOCS.name}"
    for hook in CALLBACK_HOOKS:
        assert re.search(rf"`{hook}\(state", page), (
            f"callback hook {hook} is not in {PLUGIN_DOCS.name}"
        )


def test_every_core_option_is_in_the_docs_tables():
    from nanogpt_core.config.experiment import ModelConfig, TrainConfig
    from nanogpt_core.plugins.options import internal_fields

    page = (REPO / "docs" / "experiments.md").read_text()
    for cls, table in ((ModelConfig, "model"), (TrainConfig, "train")):
        rows = page[page.index(f"<!-- options: {table} ") :].split("<!-- end options -->")[0]
        for field in attrs.fields(cls):
            if field.name in internal_fields(cls):
                continue  # filled in by the core ([train.<name>] tables), not a key
            assert f"| `{field.name}` |" in rows, f"{cls.__name__}.{field.name} is undocumented"
