"""A griffe extension for the API reference: the docstrings' reST habits in Markdown.

The docstrings are written for Sphinx (``:param x:``, which mkdocstrings' sphinx
style reads), with two habits it does not: cross-reference roles such as
``:class:`RunPaths``` (shown as code here) and a Google-style ``Attributes:``
section in a few class docstrings (turned into ``:ivar name:`` fields, which it
reads). mkdocs.yml loads this file; it changes only what the site shows.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|mod|exc|obj):`(~?)([^`]+)`")
FIELD = re.compile(r"^(\s*)(\w+): (.*)$")


def role_to_code(match: re.Match) -> str:
    """``:class:`~a.b.C``` is ``C`` in code; without ``~``, the whole path."""
    short, target = match.groups()
    return f"``{target.rsplit('.', 1)[-1] if short else target}``"


def attributes_to_fields(text: str) -> str:
    """An ``Attributes:`` section of ``name: text`` items as ``:ivar name: text`` fields."""
    out, inside, indent = [], False, ""
    for line in text.split("\n"):
        if line.strip() == "Attributes:":
            inside, indent = True, ""
            continue
        if inside:
            field = FIELD.match(line)
            if field and (not indent or field.group(1) == indent):
                indent = field.group(1)
                out.append(f":ivar {field.group(2)}: {field.group(3)}")
                continue
            if line.strip() and line.startswith(indent + " "):
                out.append("    " + line.strip())  # the item goes on
                continue
            inside = False  # the section ended
        out.append(line)
    return "\n".join(out)


class SphinxHabits(griffe.Extension):
    """Rewrite each docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(role_to_code, obj.docstring.value)
            obj.docstring.value = attributes_to_fields(text)
