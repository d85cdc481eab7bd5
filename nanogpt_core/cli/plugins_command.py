"""``gpt plugins``: the installed plugins, what they register and their options.

:func:`plugin_listing` gives the same as plain data, which the docs' option
tables are generated from. Each entry says the plugin API this nanogpt
provides (``api_version``) and what the plugin declares it supports
(``api_declared``, its module's ``NANOGPT_API``), with any warning about it.
"""

from __future__ import annotations

import json
from typing import Any

import click

from nanogpt_core import __version__
from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.plugins.contract import DECLARATION
from nanogpt_core.plugins.hookspecs import API_VERSION
from nanogpt_core.plugins.options import describe_fields
from nanogpt_core.plugins.registry import Plugins


def plugin_listing(plugins: Plugins) -> list[dict[str, Any]]:
    """Everything ``gpt plugins`` shows, as plain data (one entry per plugin)."""
    listing: list[dict[str, Any]] = []
    for info in plugins.loaded:
        plugin = plugins.manager.get_plugin(info.name)
        hooks = sorted(impl.name for impl in plugins.manager.get_hookcallers(plugin) or [])
        declared = getattr(plugin, DECLARATION, None)
        listing.append(
            {
                "name": info.name,
                "module": info.module,
                "distribution": info.distribution,
                "version": info.version,
                "api_version": API_VERSION,
                "api_declared": declared if isinstance(declared, str) else None,
                "warnings": plugins.warnings.get(info.name, []),
                "shadowed_commands": plugins.shadowed.get(info.name, []),
                "hooks": hooks,
                "registers": [
                    {
                        "kind": r.kind,
                        "name": r.name,
                        "description": r.description,
                        "options": describe_fields(r.options),
                        "conflict": plugins.registry(r.kind).conflicts.get(r.name),
                    }
                    for r in plugins.registrations_of(info.name)
                ],
            }
        )
    for info in plugins.broken:
        listing.append(
            {
                "name": info.name,
                "module": info.module,
                "distribution": info.distribution,
                "version": info.version,
                "api_version": API_VERSION,
                "error": info.error,
            }
        )
    return listing


@click.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool) -> None:
    """List installed plugins, what they register and their options, and the plugin API version.

    \b
    Examples:
      gpt plugins
      gpt plugins --json
    """
    listing = plugin_listing(plugins_of(ctx))
    if as_json:
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    click.echo(f"nanogpt {__version__}, plugin API {API_VERSION}")
    for entry in listing:
        _echo_entry(entry)


def _echo_entry(entry: dict[str, Any]) -> None:
    """Print one plugin of :func:`plugin_listing` as ``gpt plugins`` shows it."""
    origin = (
        f"{entry['distribution']} {entry['version']}" if entry["distribution"] else "in-process"
    )
    if "error" in entry:
        click.echo(f"{entry['name']} ({origin}): BROKEN: {entry['error']}")
        return
    declared = f", declares API {entry['api_declared']}" if entry["api_declared"] else ""
    click.echo(f"{entry['name']} ({origin}{declared}) hooks: {', '.join(entry['hooks'])}")
    for warning in entry["warnings"]:
        click.echo(f"  WARNING: {warning}")
    for command in entry["shadowed_commands"]:
        click.echo(f"  CONFLICT: command {command!r} is built in; the plugin's was not added")
    for reg in entry["registers"]:
        click.echo(f"  {reg['kind']} {reg['name']}: {reg['description']}")
        if reg["conflict"]:
            click.echo(f"    CONFLICT: {reg['conflict']}")
        for opt in reg["options"]:
            default = "required" if opt["required"] else f"default {json.dumps(opt['default'])}"
            click.echo(f"    {opt['name']} ({default}): {opt['doc']}")
