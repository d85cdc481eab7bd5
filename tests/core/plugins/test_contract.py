"""The plugin API's contract, checked when plugins load, through real entry points.

``API_VERSION`` and the ``NANOGPT_API`` declarations, hooks a plugin seems to
have meant but will never have called, and plugin commands named like a
built-in one. Plugins are installed the cheap way: a folder on ``PYTHONPATH``
holding a module and its ``*.dist-info`` with ``entry_points.txt``, which
``importlib.metadata`` finds exactly as it finds a pip-installed distribution.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nanogpt_core
from nanogpt_core.plugins import hookspecs


def install(site: Path, module: str, source: str) -> None:
    """A distribution ``nanogpt-<module>`` 1.0 whose one ``nanogpt`` entry point is ``module``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"nanogpt_{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nanogpt-{module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[nanogpt]\n{module} = {module}\n")


def gpt(*args: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m nanogpt_core ARGS`` with ``site`` first on the path."""
    path = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", "nanogpt_core", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def listing(site: Path, cwd: Path) -> dict[str, dict]:
    result = gpt("plugins", "--json", site=site, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


def hello(word: str, declaration: str = "") -> str:
    """A plugin adding the command ``hello-WORD``, with a declaration line if given."""
    return f"""
        from nanogpt_core import hookimpl
        {declaration}

        @hookimpl
        def register_commands(cli):
            @cli.command(name="hello-{word}")
            def hello():
                \"\"\"Say hello.\"\"\"
                print("hello {word}")
        """


def test_api_version_is_public_semantic_and_shown_by_gpt_plugins(tmp_path):
    assert nanogpt_core.API_VERSION == hookspecs.API_VERSION == "1.2.0"
    assert "API_VERSION" in nanogpt_core.__all__
    assert re.fullmatch(r"\d+\.\d+\.\d+", nanogpt_core.API_VERSION)
    site = tmp_path / "site"
    install(site, "plain", hello("plain"))
    text = gpt("plugins", site=site, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == f"nanogpt {nanogpt_core.__version__}, plugin API 1.2.0"
    entries = listing(site, tmp_path)
    assert {e["api_version"] for e in entries.values()} == {"1.2.0"}
    assert entries["plain"]["api_declared"] is None and entries["plain"]["warnings"] == []


def test_a_declaration_that_excludes_this_api_is_one_warning_and_the_plugin_loads(tmp_path):
    site = tmp_path / "site"
    install(site, "fits", hello("fits", 'NANOGPT_API = ">=1.0,<2"'))
    install(site, "future", hello("future", 'NANOGPT_API = ">=2.0"'))
    install(site, "garbled", hello("garbled", 'NANOGPT_API = "one point oh"'))
    result = gpt("hello-future", site=site, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "hello future\n")
    assert result.stderr.splitlines() == [
        "Warning: plugin 'future' (nanogpt-future 1.0) declares NANOGPT_API = '>=2.0', which "
        "excludes this plugin API (1.2.0); it is loaded anyway: update the plugin, or nanogpt",
        "Warning: plugin 'garbled' (nanogpt-garbled 1.0): NANOGPT_API = 'one point oh' is not "
        'a version specifier; declare a PEP 440 specifier such as NANOGPT_API = ">=1.0,<2"',
    ]
    entries = listing(site, tmp_path)
    assert (entries["fits"]["api_declared"], entries["fits"]["warnings"]) == (">=1.0,<2", [])
    assert entries["future"]["api_declared"] == ">=2.0"
    assert entries["future"]["warnings"] == [result.stderr.splitlines()[0][len("Warning: ") :]]
    assert "error" not in entries["garbled"]
    text = gpt("plugins", site=site, cwd=tmp_path).stdout
    assert "fits (nanogpt-fits 1.0, declares API >=1.0,<2) hooks: register_commands" in text
    assert "  WARNING: plugin 'future' (nanogpt-future 1.0) declares" in text


SHADOWING = """
from nanogpt_core import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command(name="run")
    def run():
        \"\"\"Not the built-in run.\"\"\"
        print("the plugin's run")

    @cli.command(name="mine")
    def mine():
        \"\"\"A command of its own.\"\"\"
        print("the plugin's own command")
"""


def test_a_plugin_command_cannot_shadow_a_built_in_one(tmp_path):
    site = tmp_path / "site"
    install(site, "shadow", SHADOWING)
    (tmp_path / "bad.toml").write_text("[train]\nbatch_size = 1.5\n")
    result = gpt("run", "bad.toml", site=site, cwd=tmp_path)
    # The built-in run answered: a bad experiment is its one-line error.
    assert result.returncode == 2 and "the plugin's run" not in result.stdout
    assert result.stderr.splitlines()[0] == (
        "Warning: plugin 'shadow' (nanogpt-shadow 1.0): command 'run' is a built-in command; "
        "the plugin's was not added (rename it)"
    )
    assert "train.batch_size: expected an integer" in result.stderr
    mine = gpt("mine", site=site, cwd=tmp_path)
    assert (mine.returncode, mine.stdout) == (0, "the plugin's own command\n")
    entries = listing(site, tmp_path)
    assert entries["shadow"]["shadowed_commands"] == ["run"]
    text = gpt("plugins", site=site, cwd=tmp_path).stdout
    assert "  CONFLICT: command 'run' is built in; the plugin's was not added" in text


NO_HOOK = """
def helper():
    return 1
"""

UNMARKED = """
def register_datasets(register):
    register("never", object)
"""

CLOSE_NAMES = """
from nanogpt_core import hookimpl

@hookimpl
def register_commands(cli):
    pass

def register_optimiser(register):
    pass

def register_callback(register):
    pass
"""

UNKNOWN_HOOKIMPL = """
from nanogpt_core import hookimpl

@hookimpl
def register_optimiser(register):
    pass
"""


def test_hooks_that_would_never_be_called_are_warnings_with_a_did_you_mean(tmp_path):
    site = tmp_path / "site"
    install(site, "nohook", NO_HOOK)
    install(site, "unmarked", UNMARKED)
    install(site, "close", CLOSE_NAMES)
    # Hooks imported from another module are the plugin's too: no warning.
    (site / "imported_hooks.py").write_text(textwrap.dedent(hello("imported")))
    install(site, "reexport", "from imported_hooks import register_commands\n")
    result = gpt("--help", site=site, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hooks = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
    assert result.stderr.splitlines() == [
        "Warning: plugin 'close' (nanogpt-close 1.0): register_callback matches no hook "
        '(did you mean "register_callbacks"?) and is not marked @nanogpt_core.hookimpl, so it '
        "is never called",
        "Warning: plugin 'close' (nanogpt-close 1.0): register_optimiser matches no hook "
        '(did you mean "register_optimizers"?) and is not marked @nanogpt_core.hookimpl, so '
        "it is never called",
        "Warning: plugin 'nohook' (nanogpt-nohook 1.0) implements no hook, so it registers "
        f"nothing: mark its hook functions with @nanogpt_core.hookimpl (hooks are {hooks})",
        "Warning: plugin 'unmarked' (nanogpt-unmarked 1.0): register_datasets is not marked "
        "@nanogpt_core.hookimpl, so it is never called",
    ]
    entries = listing(site, tmp_path)
    assert len(entries["close"]["warnings"]) == 2
    assert entries["reexport"]["warnings"] == []
    assert gpt("hello-imported", site=site, cwd=tmp_path).stdout == "hello imported\n"
    assert "error" not in entries["nohook"] and entries["unmarked"]["registers"] == []


def test_a_hookimpl_named_like_no_hook_is_one_line_with_a_did_you_mean(tmp_path):
    site = tmp_path / "site"
    install(site, "misspelled", UNKNOWN_HOOKIMPL)
    install(site, "fine", hello("fine"))
    result = gpt("hello-fine", site=site, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "hello fine\n")
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "Warning: plugin 'misspelled' (nanogpt-misspelled 1.0) failed to load: @hookimpl "
        "'register_optimiser' matches no hook (did you mean \"register_optimizers\"?); hooks are "
    )
    assert listing(site, tmp_path)["misspelled"]["error"] == line.split("failed to load: ")[1]
