"""The ``gpt`` click group: its error handling, ``--debug``, and the plugins it carries.

A user error (:class:`NanoGPTError`) ends a command with ``Error:`` lines and
the error's exit status, not a traceback, unless ``--debug`` or ``GPT_DEBUG=1``
asks for one; anything else a plugin's command raises is one
:class:`PluginFault` line naming it (exit 1). The group's context object is the :class:`Plugins` of this
invocation, which commands read with :func:`plugins_of`.
"""

from __future__ import annotations

import os
from typing import Any

import click

from nanogpt_core import __version__
from nanogpt_core.data.plugins import plugin_who
from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.main_process import end_process_group
from nanogpt_core.plugins.registry import Plugins, load_plugins

DEBUG_ENV = "GPT_DEBUG"
INTERRUPTED = 130


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """Whether tracebacks should be shown (``--debug`` or ``GPT_DEBUG=1``)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    root = ctx.find_root() if ctx else None
    return bool(root and root.meta.get("gpt.debug"))


def report(error: NanoGPTError) -> None:
    """Print a user-facing error, one ``Error:`` line per problem, on stderr."""
    for line in str(error).splitlines() or [type(error).__name__]:
        click.echo(f"Error: {line}", err=True)


class GptGroup(click.Group):
    """A click group that turns :class:`NanoGPTError` into one-line errors and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, reporting user errors without a traceback.

        Ctrl-C outside training (during start-up, preparing data) exits 130 like
        an interrupted run, not click's "Aborted!" with status 1.
        """
        try:
            return super().invoke(ctx)
        except NanoGPTError as error:
            if debug_enabled(ctx):
                raise
            report(error)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            if debug_enabled(ctx):
                raise
            click.echo("Interrupted.", err=True)
            ctx.exit(INTERRUPTED)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click reports these itself
        except Exception as exc:
            fault = plugin_command_fault(ctx, exc)
            if fault is None or debug_enabled(ctx):
                raise  # the core's own bug: its traceback is what a report needs
            report(fault)
            ctx.exit(fault.exit_code)
        finally:
            end_process_group()


def plugin_command_fault(ctx: click.Context, exc: Exception) -> PluginFault | None:
    """The one line a plugin's command that raised ``exc`` becomes; None for a core command.

    A command is a plugin's when its callback is defined outside ``nanogpt_core``;
    the plugin is the registered module (or class) the callback comes from.
    """
    name = ctx.invoked_subcommand
    command = (
        ctx.command.get_command(ctx, name)
        if name and isinstance(ctx.command, click.Group)
        else None
    )
    module = getattr(getattr(command, "callback", None), "__module__", None) or ""
    if command is None or module.split(".")[0] == "nanogpt_core":
        return None
    plugin = module
    plugins = ctx.find_object(Plugins)
    for plugin_name, registered in plugins.manager.list_name_plugin() if plugins else ():
        if module in (getattr(registered, "__name__", None), type(registered).__module__):
            plugin = plugin_name
            break
    who = plugin_who("command", name, plugin)
    return PluginFault(f"{who} failed: {type(exc).__name__}: {exc}")


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """Remember ``--debug`` where :func:`debug_enabled` looks for it."""
    ctx.meta["gpt.debug"] = value
    return value


def plugins_of(ctx: click.Context) -> Plugins:
    """The :class:`Plugins` this invocation was built with."""
    return ctx.find_object(Plugins) or load_plugins()


def new_group(plugins: Plugins) -> click.Group:
    """The bare ``gpt`` group, carrying ``plugins``: no commands yet."""

    @click.group(
        cls=GptGroup, context_settings={"obj": plugins, "help_option_names": ["-h", "--help"]}
    )
    @click.version_option(__version__, prog_name="gpt")
    @click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help="Show tracebacks for errors (env: GPT_DEBUG=1).",
    )
    def gpt() -> None:
        """Pre-train GPT models from experiment files, extended by plugins.

        \b
        Examples:
          gpt run experiments/shakespeare_char.toml
          gpt plugins
        """

    return gpt
