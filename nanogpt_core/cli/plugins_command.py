"""``gpt plugins``: the installed plugins, what they register and their options.

:func:`plugin_listing` gives the same as plain data, which the docs' option
tables are generated from.
"""

from __future__ import annotations

import json
from typing import Any

import click

from nanogpt_core.cli.gpt_group import plugins_of
from nanogpt_core.plugins.options import describe_fields
from nanogpt_core.plugins.registry import Plugins


def plugin_listing(plugins: Plugins) -> list[dict[str, Any]]:
    """Everything ``gpt plugins`` shows, as plain data (one entry per plugin)."""
    listing: list[dict[str, Any]] = []
    for info in plugins.loaded:
        hooks = sorted(
            impl.name
            for impl in plugins.manager.get_hookcallers(plugins.manager.get_plugin(info.name)) or []
        )
        listing.append(
            {
                "name": info.name,
                "module": info.module,
                "distribution": info.distribution,
                "version": info.version,
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
                "error": info.error,
            }
        )
    return listing


@click.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool) -> None:
    """List installed plugins, what they register and their options.

    \b
    Examples:
      gpt plugins
      gpt plugins --json
    """
    listing = plugin_listing(plugins_of(ctx))
    if as_json:
        click.echo(json.dumps(listing, indent=2, default=str))
        return
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
    click.echo(f"{entry['name']} ({origin}) hooks: {', '.join(entry['hooks'])}")
    for reg in entry["registers"]:
        click.echo(f"  {reg['kind']} {reg['name']}: {reg['description']}")
        if reg["conflict"]:
            click.echo(f"    CONFLICT: {reg['conflict']}")
        for opt in reg["options"]:
            default = "required" if opt["required"] else f"default {json.dumps(opt['default'])}"
            click.echo(f"    {opt['name']} ({default}): {opt['doc']}")
