"""The `gpt` command: errors, --dry-run, --debug, `gpt plugins`, the installed script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from nanogpt_core import hookimpl, option
from nanogpt_core.cli import make_cli
from nanogpt_core.errors import ConfigError
from nanogpt_core.plugins.registry import PluginInfo, load_plugins
from nanogpt_plugins.optimizers import adamw
from nanogpt_plugins.schedules import standard


@attrs.frozen(kw_only=True)
class LinesOptions:
    """Options of a toy dataset."""

    lines: int = option(5, "How many lines.")


class Lines:
    @hookimpl
    def register_datasets(self, register):
        register("lines", lambda o: o, options=LinesOptions, description="A toy dataset.")


@pytest.fixture
def cli():
    plugins = load_plugins(entry_points=False, disabled=())
    plugins.register(
        Lines(), name="lines-plugin", info=PluginInfo("lines-plugin", "tests", "lines-dist", "1.2")
    )
    # The optimizer and schedule every experiment names by default, as installed.
    plugins.register(adamw, name="adamw")
    plugins.register(standard, name="schedules")
    plugins.broken.append(
        PluginInfo("bad", "bad_mod", "bad-dist", "0.1", error="ImportError: nope")
    )
    return make_cli(plugins)


GOOD = '[dataset]\nplugin = "lines"\nlines = 3\n[model]\nn_layer = 2\n'


def run_in(tmp_path: Path, cli, args, env=None):
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        return CliRunner().invoke(cli, args, env=env or {})
    finally:
        os.chdir(old)


def test_bad_experiment_is_one_line_exit_2_and_writes_nothing(tmp_path, write_toml, cli):
    write_toml("x.toml", GOOD.replace("lines = 3", 'lines = "three"'))
    result = run_in(tmp_path, cli, ["run", "x.toml"])
    assert result.exit_code == 2
    assert result.output == 'Error: x.toml: dataset.lines: expected an integer, got "three"\n'
    assert "Traceback" not in result.output
    assert not (tmp_path / "results").exists()


def test_debug_flag_and_env_show_the_traceback(tmp_path, write_toml, cli):
    write_toml("x.toml", "[dataset]\n")
    for args, env in (
        (["--debug", "run", "x.toml"], None),
        (["run", "x.toml"], {"GPT_DEBUG": "1"}),
    ):
        result = run_in(tmp_path, cli, args, env)
        assert isinstance(result.exception, ConfigError), args


def test_dry_run_prints_the_resolved_experiment(tmp_path, write_toml, cli):
    write_toml("x.toml", GOOD)
    result = run_in(
        tmp_path, cli, ["run", "x.toml", "--dry-run", "--set", "train.learning_rate=3e-4"]
    )
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["name"] == "x"
    assert resolved["dataset"] == {"plugin": "lines", "lines": 3}
    assert resolved["model"]["n_layer"] == 2
    assert resolved["train"]["learning_rate"] == 3e-4
    assert not (tmp_path / "results").exists()


def test_abstract_experiment_is_refused(tmp_path, write_toml, cli):
    write_toml("base.toml", "abstract = true\n" + GOOD)
    result = run_in(tmp_path, cli, ["run", "base.toml", "--dry-run"])
    assert result.exit_code == 2
    assert "abstract = true" in result.output


def test_plugins_json_lists_options_and_broken_plugins(cli):
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listing = {p["name"]: p for p in json.loads(result.output)}
    lines = listing["lines-plugin"]
    assert (lines["distribution"], lines["version"]) == ("lines-dist", "1.2")
    assert lines["hooks"] == ["register_datasets"]
    (registered,) = lines["registers"]
    assert registered["name"] == "lines" and registered["description"] == "A toy dataset."
    assert registered["options"] == [
        {"name": "lines", "type": "int", "default": 5, "required": False, "doc": "How many lines."}
    ]
    assert listing["bad"]["error"] == "ImportError: nope"


def test_plugins_text_listing(cli):
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "lines-plugin (lines-dist 1.2) hooks: register_datasets" in result.output
    assert "    lines (default 5): How many lines." in result.output
    assert "bad (bad-dist 0.1): BROKEN: ImportError: nope" in result.output


def gpt_script() -> str:
    return str(Path(sys.executable).with_name("gpt"))


def test_installed_script_runs_in_a_subprocess(tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nbatch_size = 1.5\n")
    result = subprocess.run(
        [gpt_script(), "run", "bad.toml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "Error: bad.toml: dataset: missing required key",
        "Error: bad.toml: train.batch_size: expected an integer, got 1.5",
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()
    listing = subprocess.run(
        [gpt_script(), "plugins", "--json"], capture_output=True, text=True, check=True
    )
    assert "shakespeare" in {p["name"] for p in json.loads(listing.stdout)}


def test_help_and_plugins_never_import_torch():
    code = (
        "import sys\n"
        "from nanogpt_core.cli import main\n"
        "for args in (['--help'], ['plugins', '--json'], ['run', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'datasets', 'tensorboard', 'accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "HEAVY []" in result.stderr
