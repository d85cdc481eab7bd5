"""Plugin faults are contained: a bad plugin is reported and everything else keeps working.

The subprocess tests install real third-party distributions the cheap way: a
folder on PYTHONPATH holding a module and its ``*.dist-info`` with
``entry_points.txt``, which ``importlib.metadata`` finds exactly as it finds a
pip-installed plugin.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

import nanogpt_core
from nanogpt_core import Callback, hookimpl, option
from nanogpt_core.errors import PluginError
from nanogpt_core.plugins.registry import load_plugins

REPO = Path(__file__).resolve().parents[3]


def install_fake_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """A distribution ``dist`` with one module and a ``nanogpt`` entry point named ``module``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[nanogpt]\n{module} = {module}\n")


def gpt(*args: str, site: Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


WRONG_ARGUMENT = """
from nanogpt_core import hookimpl

@hookimpl
def register_datasets(registry):  # the spec's argument is "register"
    registry("oops", lambda options: None)
"""

FINE = """
from nanogpt_core import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command()
    def hello():
        \"\"\"Say hello.\"\"\"
        print("hello from a plugin")
"""


def test_wrong_argument_names_make_a_broken_plugin_and_the_rest_works(tmp_path):
    site = tmp_path / "site"
    install_fake_distribution(site, "nanogpt-wrongargs", "wrongargs", WRONG_ARGUMENT)
    install_fake_distribution(site, "nanogpt-fine", "fine", FINE)
    result = gpt("--help", site=site, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout and "run" in result.stdout
    assert "Warning: plugin 'wrongargs' (nanogpt-wrongargs 1.0) failed to load" in result.stderr
    assert "registry" in result.stderr and "Traceback" not in result.stderr
    listing = gpt("plugins", "--json", site=site, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    entries = {entry["name"]: entry for entry in json.loads(listing.stdout)}
    assert "error" in entries["wrongargs"] and "error" not in entries["fine"]
    assert "shakespeare" in entries
    assert gpt("hello", site=site, cwd=tmp_path).stdout == "hello from a plugin\n"


SECOND_SHAKESPEARE = """
import attrs
from nanogpt_core import hookimpl

@attrs.frozen(kw_only=True)
class Options:
    pass

@hookimpl
def register_datasets(register):
    register("shakespeare", lambda options: None, options=Options)
"""


def test_a_name_two_plugins_register_fails_only_where_it_is_used(tmp_path, write_toml):
    site = tmp_path / "site"
    install_fake_distribution(site, "nanogpt-bard", "bard", SECOND_SHAKESPEARE)
    listing = gpt("plugins", site=site, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "CONFLICT: dataset 'shakespeare' is registered by both" in listing.stdout
    ours = importlib.metadata.version("nanogpt")  # as installed (an editable install keeps its own)
    assert "(nanogpt-bard 1.0)" in listing.stdout and f"(nanogpt {ours})" in listing.stdout
    # An experiment on another dataset is unaffected ...
    other = write_toml("other.toml", '[dataset]\nplugin = "tinystories"\n')
    assert gpt("run", str(other), "--dry-run", site=site, cwd=tmp_path).returncode == 0
    # ... one that uses the name fails in one line naming both distributions.
    clash = write_toml("clash.toml", '[dataset]\nplugin = "shakespeare"\n')
    result = gpt("run", str(clash), "--dry-run", site=site, cwd=tmp_path)
    assert result.returncode == 2
    assert "nanogpt-bard" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_callback_method_matching_no_hook_is_refused_at_load():
    class Typo(Callback):
        def on_step_ended(self, state):
            pass

    class Plugin:
        @hookimpl
        def register_callbacks(self, register):
            register("typo", Typo)

    plugins = load_plugins(entry_points=False, disabled=())
    assert not plugins.register(Plugin(), name="typo-plugin")
    assert "'on_step_ended' matches no hook (did you mean \"on_step_end\"?)" in (
        plugins.broken[0].error
    )
    assert "typo" not in plugins.callbacks()


def test_register_hooks_may_not_be_wrappers_and_tryfirst_trylast_order_registrations():
    class Wrapper:
        @hookimpl(wrapper=True)
        def register_datasets(self, register):
            return (yield)

    def dataset_plugin(name, **marks):
        class Plugin:
            @hookimpl(**marks)
            def register_datasets(self, register):
                register(name, lambda options: None)

        return Plugin()

    plugins = load_plugins(entry_points=False, disabled=())
    assert not plugins.register(Wrapper(), name="wrapper")
    assert "register_datasets cannot be a wrapper" in plugins.broken[0].error
    plugins.register(dataset_plugin("plain"), name="plain")
    plugins.register(dataset_plugin("late", trylast=True), name="late")
    plugins.register(dataset_plugin("early", tryfirst=True), name="early")
    assert list(plugins.datasets()) == ["early", "plain", "late"]


def test_a_failing_register_hook_breaks_only_its_plugin():
    class Crashes:
        @hookimpl
        def register_callbacks(self, register):
            raise RuntimeError("boom")

    class Fine:
        @hookimpl
        def register_callbacks(self, register):
            register("fine", lambda options: Callback())

    plugins = load_plugins(entry_points=False, disabled=())
    plugins.register(Crashes(), name="crashy")
    plugins.register(Fine(), name="fine")
    assert (
        plugins.broken[0].error
        == "plugin 'crashy' failed in register_callbacks: RuntimeError: boom"
    )
    assert list(plugins.callbacks()) == ["fine"]


@attrs.frozen(kw_only=True)
class BoomOptions:
    """Options of the failing callback."""

    at_step: int = option(3, "Raise at this step.")


BOOM = """
import attrs
from nanogpt_core import Callback, hookimpl, option

@attrs.frozen(kw_only=True)
class Options:
    at_step: int = option(3, "Raise at this step.")

class Boom(Callback):
    def __init__(self, options):
        self.options = options

    def on_step_end(self, state):
        state.request_save("last.pth")  # asked for, but the step fails
        if state.step == self.options.at_step:
            raise ZeroDivisionError("the plugin divided by zero")

class NotACallback:
    pass

@hookimpl
def register_callbacks(register):
    register("boom", Boom, options=Options)
    register("not_a_callback", lambda options: NotACallback())
"""


def test_a_callback_exception_is_one_line_exit_1_and_saves_nothing_from_that_step(
    tmp_path, tiny_char_experiment, session_data_dir
):
    site = tmp_path / "site"
    install_fake_distribution(site, "nanogpt-boom", "boom", BOOM)
    extra = '[[callbacks]]\nplugin = "checkpoint"\nevery_steps = 2\n[[callbacks]]\nplugin = "boom"\nat_step = 5\n'
    path = tiny_char_experiment(extra=extra)
    args = ["run", str(path), "--data-dir", str(session_data_dir)]
    result = gpt(*args, site=site, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "Error: callback 'boom' (callbacks[1]) failed in on_step_end: "
        "ZeroDivisionError: the plugin divided by zero"
    )
    assert "Traceback" not in result.stderr
    last = tmp_path / "results" / "tiny" / "checkpoints" / "last.pth"
    from nanogpt_core.train.checkpoints import load_checkpoint

    assert load_checkpoint(last, resume=True)["step"] == 4  # never step 5
    debug = gpt("--debug", *args, site=site, cwd=tmp_path)
    assert "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr


def test_a_factory_returning_no_callback_is_one_line_naming_the_plugin(
    tmp_path, tiny_char_experiment, session_data_dir
):
    site = tmp_path / "site"
    install_fake_distribution(site, "nanogpt-boom", "boom", BOOM)
    path = tiny_char_experiment(extra='[[callbacks]]\nplugin = "not_a_callback"\n')
    result = gpt("run", str(path), "--data-dir", str(session_data_dir), site=site, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: plugin 'boom': callback 'not_a_callback': the factory returned NotACallback, "
        "which lacks on_train_start, on_step_end, on_eval_end, on_epoch_end, on_checkpoint, "
        "on_metrics, on_train_end, state_dict, load_state_dict; subclass nanogpt_core.Callback"
    ]
    assert not (tmp_path / "results" / "tiny").exists()


def test_the_public_api_is_importable_without_torch_and_covers_the_builtins():
    code = "import sys, nanogpt_core; print(sorted(nanogpt_core.__all__)); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[1] == "False"
    for name in nanogpt_core.__all__:
        assert getattr(nanogpt_core, name) is not None, name
    # The built-in plugins use nothing but the public surface.
    for path in (REPO / "plugins" / "nanogpt_plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanogpt_core"):
                assert node.module == "nanogpt_core", f"{path}: imports {node.module}"
                assert all(alias.name in nanogpt_core.__all__ for alias in node.names), path


def test_conflict_lookups_raise_but_listing_works():
    class One:
        @hookimpl
        def register_datasets(self, register):
            register("same", lambda options: None)

    plugins = load_plugins(entry_points=False, disabled=())
    plugins.register(One(), name="one")
    plugins.register(One(), name="two")
    assert "same" in plugins.datasets()
    with pytest.raises(PluginError, match="registered by both plugin 'one' and plugin 'two'"):
        plugins.datasets()["same"]
    assert len(plugins.conflicts()) == 1
