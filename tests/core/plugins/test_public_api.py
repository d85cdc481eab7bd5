"""Everything a plugin is told about can be imported from ``nanogpt_core``.

The plugin guide (docs/plugins.md, the eval task guide in docs/evaluation.md),
the hook specifications and the docstrings of every public name mention classes,
errors and types; a plugin author who reads ``EvalInputError`` or
``nanogpt_core.Request`` there must find it in ``nanogpt_core``. Each mention is
resolved against the package's ``__all__``.
"""

from __future__ import annotations

import builtins
import inspect
import re
import typing
from pathlib import Path

import pytest

import nanogpt_core
from nanogpt_core.plugins import hookspecs

REPO = Path(__file__).resolve().parents[3]
PAGES = ("docs/plugins.md", "docs/evaluation.md")
# Capitalised words in backticks that are not ours to export: placeholders of
# the guide, Python's constants, other libraries' classes.
NOT_OURS = {
    "None",
    "True",
    "False",
    "OptionsClass",
    "TaskClass",
    "TokenizerClass",
    "TemplateClass",
    "PluginManager",
    "Error",  # the CLI's "Error: ..." line, quoted in the guide
}
# Modules the guide names as deprecated (an import of them warns, naming what to use).
DEPRECATED_MODULES = {"documents"}
DOTTED = re.compile(r"\bnanogpt_core\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
# ``Name``, `Name`, :class:`Name`, :class:`~pkg.Name`, :raises Name:
NAMED = re.compile(r"(?:``?|:raises )~?([A-Z][A-Za-z0-9_]*[a-z][A-Za-z0-9_]*)(?:``?|:)")


def docstrings_of_public_names() -> dict[str, str]:
    """The docstring of each exported name and of each of its public members."""
    texts = {}
    for name in nanogpt_core.__all__:
        obj = getattr(nanogpt_core, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            texts[name] = inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                value = value.fget if isinstance(value, property) else value
                texts[f"{name}.{member}"] = getattr(value, "__doc__", None) or ""
    return texts


def texts_a_plugin_author_reads() -> dict[str, str]:
    texts = {page: (REPO / page).read_text() for page in PAGES}
    texts["hookspecs"] = hookspecs.__doc__ or ""
    for name, spec in vars(hookspecs).items():
        if name.startswith("register_") and callable(spec):
            texts[f"hookspecs.{name}"] = spec.__doc__ or ""
    texts.update(docstrings_of_public_names())
    return texts


def unresolved(texts: dict[str, str]) -> list[str]:
    """``where: name`` for each mention that ``nanogpt_core`` does not export."""
    found = []
    for where, text in texts.items():
        for dotted in DOTTED.findall(text):
            head, *rest = dotted.split(".")
            if head in DEPRECATED_MODULES:
                continue
            obj = getattr(nanogpt_core, head, None) if head in nanogpt_core.__all__ else None
            for part in rest:
                obj = getattr(obj, part, None)
            if obj is None:
                found.append(f"{where}: nanogpt_core.{dotted}")
        for name in NAMED.findall(text):
            elsewhere = NOT_OURS | set(dir(builtins)) | set(dir(typing))
            if name not in elsewhere and name not in nanogpt_core.__all__:
                found.append(f"{where}: {name}")
    return sorted(set(found))


def test_every_name_the_plugin_docs_mention_is_importable_from_nanogpt_core():
    assert unresolved(texts_a_plugin_author_reads()) == []


def test_the_scan_notices_a_name_that_is_not_exported():
    """The check above can fail: a submodule path or a private class is reported."""
    texts = {
        "a": "returns a :class:`nanogpt_core.train.callbacks.Callback`",
        "b": "raises ``StopRequest`` when asked",
        "c": ":raises CheckpointError: when the file is torn",
        "d": "see `nanogpt_core.Evaluator.loglikelihood` and ``EvalInputError``",
    }
    assert unresolved(texts) == [
        "a: nanogpt_core.train.callbacks.Callback",
        "b: StopRequest",
        "c: CheckpointError",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "Request",
        "EvalInputError",
        "OptionValueError",
        "StorageError",
        "ExperimentConfig",
        "TrainConfig",
    ],
)
def test_names_the_issue_found_missing_are_exported_and_documented(name):
    assert name in nanogpt_core.__all__
    assert f"::: nanogpt_core.{name}" in (REPO / "docs" / "api.md").read_text()
    assert f"`{name}" in (REPO / "docs" / "plugins.md").read_text()


def test_option_value_error_has_the_documented_signature():
    error = nanogpt_core.OptionValueError("beta1", "must be in [0, 1), got 1.5")
    assert (error.field, error.message) == ("beta1", "must be in [0, 1), got 1.5")
    assert "`OptionValueError(field, message)`" in (REPO / "docs" / "plugins.md").read_text()
