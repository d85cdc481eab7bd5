"""The ``gpt`` command: :func:`main` is the console script, :func:`make_cli` builds it.

Everything heavy (torch, datasets) is imported inside the commands that need it,
so ``gpt --help`` and ``gpt plugins`` stay fast. Plugins are loaded in
:func:`main`, never at import time, and handed to the commands through click's
context object.

Where things are: the group and its error handling in ``gpt_group``, options
several commands share in ``shared_options``, and the commands by concern in
``train_commands`` (run, prepare, batch; ``batch_runs`` runs a batch), ``plan_command`` (plan),
``generate_commands`` (sample, chat, serve, export), ``eval_commands`` (eval,
compare) and ``plugins_command`` (plugins).
"""

from __future__ import annotations

import sys

import click

from nanogpt_core.cli.eval_commands import compare, eval_command
from nanogpt_core.cli.generate_commands import chat, export, sample, serve
from nanogpt_core.cli.gpt_group import INTERRUPTED, debug_enabled, new_group, report
from nanogpt_core.cli.plan_command import plan_command
from nanogpt_core.cli.plugins_command import plugins_command
from nanogpt_core.cli.train_commands import batch, prepare, run
from nanogpt_core.errors import NanoGPTError
from nanogpt_core.plugins.registry import Plugins, load_plugins

__all__ = ["main", "make_cli"]

CORE_COMMANDS = (
    run,
    prepare,
    plan_command,
    sample,
    chat,
    serve,
    batch,
    compare,
    export,
    eval_command,
    plugins_command,
)


def make_cli(plugins: Plugins) -> click.Group:
    """Build the ``gpt`` group with the core commands and those plugins add."""
    gpt = new_group(plugins)
    for command in CORE_COMMANDS:
        gpt.add_command(command)
    for failure in plugins.add_commands(gpt):
        click.echo(f"Warning: {failure}", err=True)
    return gpt


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``gpt`` console script."""
    try:
        plugins = load_plugins()
        for info in plugins.broken:
            origin = f" ({info.distribution} {info.version})" if info.distribution else ""
            click.echo(
                f"Warning: plugin {info.name!r}{origin} failed to load: {info.error}", err=True
            )
        for line in plugins.warning_lines():
            click.echo(f"Warning: {line}", err=True)
        cli = make_cli(plugins)
    except NanoGPTError as error:
        # The group's own error handling is not in place yet: do its job here.
        if debug_enabled() or "--debug" in (argv if argv is not None else sys.argv):
            raise
        report(error)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(INTERRUPTED)
    cli.main(args=argv, prog_name="gpt")
