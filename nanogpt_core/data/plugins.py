"""The plugins a preparation uses: the dataset source, its tokenizer and its template.

A dataset plugin's factory returns a :class:`DatasetSource`, which names its
tokenizer (and, for instruction-tuning examples, its template); an experiment's
``[tokenizer]`` or ``[template]`` table may choose another. This module makes
the source and checks what it returned, chooses the tokenizer and template
(:func:`plugin_choice`), makes them and checks their descriptions, and turns
whatever a plugin raises into one line naming it (:func:`plugin_call`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from nanogpt_core.errors import ConfigError, DataError, NanoGPTError, PluginError, PluginFault
from nanogpt_core.plugins.options import OptionProblems, structure, suggest, unstructure

if TYPE_CHECKING:
    from nanogpt_core.config.experiment import ExperimentConfig
    from nanogpt_core.data.templates import Template
    from nanogpt_core.data.tokenizers import Tokenizer
    from nanogpt_core.plugins.registry import Plugins, Registration

VARIANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class DatasetSource(Protocol):
    """What a dataset plugin's factory returns.

    Attributes:
        variant: the folder under ``<data_dir>/<plugin>/`` (e.g. ``"tiny-char"``);
            letters, digits, ``.``, ``_``, ``-`` and ``+``. Options that change the
            tokens but not the variant are caught by the fingerprint.
        tokenizer: the name of a registered tokenizer (``"char"``, ``"gpt2"``, ...);
            an experiment's ``[tokenizer]`` table overrides it.
        description: one line about the source, recorded in ``meta.json``.

    A source yields its documents in one of two ways, and defines either or both:

    - ``documents(split, downloads)`` (below), called once per split;
    - ``split_documents(downloads)``, yielding ``(split, text)`` pairs in one
      pass, for a source that decides the split while reading (holding out
      documents by hash, say). When a source defines both, it is used instead
      of ``documents``.

    Optional methods (looked up with ``getattr``; a source without them works):

    - ``token_estimate(tokenizer) -> Mapping[str, int] | None``: the tokens each
      split will hold once prepared, ``{"train": n, "val": m}``, with the
      registered tokenizer named ``tokenizer`` (the source's own, or the one an
      experiment's ``[tokenizer]`` table chose), for ``gpt plan`` before the data
      is prepared. An example source (one with a ``template``) counts the
      tokens of its examples (prompt, response and end-of-text) and may add
      ``"train_examples"`` and ``"val_examples"``. Return None when the source
      cannot say (a tokenizer it knows nothing about). It must be cheap: a
      published count, file sizes, Parquet footers, at most one small column
      read from local files; never a download and never a pass over the text.
      :func:`nanogpt_core.tokens_from_text_bytes` turns bytes of text into
      tokens for the built-in tokenizers. Raise
      :class:`~nanogpt_core.DataError` for bad input (a missing file).
    """

    variant: str
    tokenizer: str
    description: str

    def documents(self, split: str, downloads: Path) -> Iterable[str]:
        """Yield the documents of ``split`` (``"train"`` or ``"val"``), in order.

        :param downloads: a folder the plugin may cache downloads in.

        Optional when the source defines ``split_documents(downloads)`` instead
        (see the class). Raise :class:`~nanogpt_core.DataError` for bad input; any other
        exception is reported as a fault of the plugin (exit status 1).
        """


@attrs.frozen
class PluginChoice:
    """The tokenizer or template a preparation uses: registered name, registration, options.

    ``from_table`` is true when the experiment's ``[tokenizer]`` or ``[template]``
    table chose it rather than the dataset source.
    """

    name: str
    registration: Registration
    options: Any
    from_table: bool = False


TokenizerChoice = PluginChoice
TemplateChoice = PluginChoice


# Naming a plugin in messages, and reporting what it raises.


def plugin_who(kind: str, name: str, plugin: str) -> str:
    """``dataset 'x' (plugin 'y')``, or ``dataset plugin 'x'`` when the names agree."""
    return f"{kind} plugin {name!r}" if name == plugin else f"{kind} {name!r} (plugin {plugin!r})"


@contextlib.contextmanager
def plugin_call(who: str, method: str) -> Iterator[None]:
    """Report an exception a plugin raises inside the block as one :class:`PluginFault` line.

    A :class:`NanoGPTError` (bad input the plugin reported well) passes unchanged;
    the original exception is chained, so ``--debug`` shows its traceback.
    """
    try:
        yield
    except NanoGPTError:
        raise
    except Exception as exc:
        raise plugin_fault(who, method, exc) from exc


def plugin_fault(who: str, method: str, exc: BaseException) -> PluginFault:
    """The one line an exception ``exc`` raised in a plugin's ``method`` becomes.

    For call sites that cannot afford a context manager (the training step);
    the caller raises it ``from exc`` and lets a :class:`NanoGPTError` pass.
    """
    return PluginFault(f"{who} failed in {method}: {type(exc).__name__}: {exc}")


class Contained:
    """A plugin's object (a tokenizer, a template) whose method calls are each a :func:`plugin_call`.

    Attributes read through unchanged; calling a public method reports what it
    raises as one line naming ``who`` and the method. Sampling, chat and
    serving hold their rebuilt tokenizer and template this way, so a fault deep
    in a streamed answer still names the plugin.
    """

    __slots__ = ("_target", "_who")

    def __init__(self, target: Any, who: str) -> None:
        self._target = target
        self._who = who

    def __getattr__(self, name: str) -> Any:
        # Not self._target: while a copy or unpickling builds the object, the slot
        # is empty and that lookup would come back here forever.
        value = getattr(object.__getattribute__(self, "_target"), name)
        if name.startswith("_") or not callable(value):
            return value
        who = self._who

        def call(*args: Any, **kwargs: Any) -> Any:
            with plugin_call(who, name):
                return value(*args, **kwargs)

        return call


def unwrapped(made: Any) -> Any:
    """The plugin's own object inside a :class:`Contained`, for handing to other plugins.

    Their code may catch what the object raises (a ``ValueError`` from
    ``encode``, say), which must reach them as it was raised.
    """
    return made._target if isinstance(made, Contained) else made


# The dataset source.


def dataset_who(config: ExperimentConfig, plugins: Plugins) -> str:
    """How messages name the experiment's dataset plugin."""
    name = config.dataset.plugin
    return plugin_who("dataset", name, plugins.datasets()[name].plugin)


def source_for(config: ExperimentConfig, plugins: Plugins) -> DatasetSource:
    """Instantiate the experiment's dataset plugin and check what its factory returned."""
    registration = plugins.datasets()[config.dataset.plugin]
    who = dataset_who(config, plugins)
    with plugin_call(who, "its factory"):
        source = registration.factory(config.dataset.options)
    check_source(source, who)
    return source


def is_example_source(source: Any) -> bool:
    """Whether a dataset source yields examples (it names a template) rather than documents."""
    return hasattr(source, "template")


def check_source(source: Any, who: str) -> None:
    """A dataset source has a usable ``variant``, ``tokenizer``, ``description`` and documents.

    Documents come from ``documents`` or ``split_documents`` (either or both); an
    example source (one with a ``template``) has ``examples`` or ``split_examples``.
    """
    missing = [
        f"{attr} (a string)"
        for attr in ("variant", "tokenizer", "description")
        if not isinstance(getattr(source, attr, None), str)
    ]
    if is_example_source(source):
        missing += _missing_from_example_source(source)
    elif not any(callable(getattr(source, m, None)) for m in ("documents", "split_documents")):
        missing.append("documents or split_documents (a method)")
    if missing:
        raise PluginError(
            f"{who}: its factory returned {type(source).__name__}, which lacks "
            f"{', '.join(missing)}; see nanogpt_core.DatasetSource"
        )
    if not VARIANT_PATTERN.fullmatch(source.variant) or ".." in source.variant:
        raise PluginError(
            f"{who}: variant {source.variant!r} is not usable as a folder name "
            "(use letters, digits, '.', '_', '-' and '+')"
        )


def _missing_from_example_source(source: Any) -> list[str]:
    """What an example source lacks: a ``template`` name and an ``examples`` method."""
    missing = []
    if not isinstance(getattr(source, "template", None), str):
        missing.append("template (a string)")
    if not any(callable(getattr(source, m, None)) for m in ("examples", "split_examples")):
        missing.append("examples (a method)")
    return missing


# Choosing the tokenizer and the template.


def plugin_choice(
    kind: str, config: ExperimentConfig, source: DatasetSource, plugins: Plugins
) -> PluginChoice:
    """The ``kind`` (``"tokenizer"`` or ``"template"``) to prepare with.

    The experiment's ``[kind]`` table when it has one, else the name the source
    gives in its attribute of that name, with that plugin's default options.
    """
    registry = plugins.registry(kind)
    spec = getattr(config, kind, None)
    if spec is not None:
        name, where = spec.plugin, f"{kind}.plugin"
    else:
        name = getattr(source, kind)
        has_option = hasattr(config.dataset.options, kind)
        where = f"dataset.{kind}" if has_option else f"dataset {config.dataset.plugin!r}"
    registration = registry.get(name)
    if registration is None:
        installed = ", ".join(sorted(registry)) or "none"
        raise DataError(
            f"{where}: no {kind} named {name!r}{suggest(name, list(registry))}; "
            f"installed: {installed}"
        )
    if spec is not None:
        return PluginChoice(name, registration, _table_options(kind, spec, registration), True)
    return PluginChoice(name, registration, _default_options(kind, registration, name, where))


def tokenizer_choice(
    config: ExperimentConfig, source: DatasetSource, plugins: Plugins
) -> TokenizerChoice:
    """The tokenizer to prepare with: the ``[tokenizer]`` table's, else the source's."""
    return plugin_choice("tokenizer", config, source, plugins)


def template_choice(config: ExperimentConfig, source: Any, plugins: Plugins) -> TemplateChoice:
    """The experiment's ``[template]`` table, else the source's template with default options."""
    return plugin_choice("template", config, source, plugins)


def _table_options(kind: str, spec: Any, registration: Registration) -> Any:
    """The ``[kind]`` table's options (structured here if config loading did not)."""
    if not isinstance(spec.options, dict):
        return spec.options
    try:
        return structure(spec.options, registration.options, kind)
    except OptionProblems as exc:
        raise ConfigError(exc.problems) from None


def _default_options(kind: str, registration: Registration, name: str, where: str) -> Any:
    """The plugin's default options; one that requires some asks for a ``[kind]`` table."""
    required = [f.name for f in attrs.fields(registration.options) if f.default is attrs.NOTHING]
    if required:
        raise DataError(
            f"{where}: {kind} {name!r} needs {', '.join(required)}: add a [{kind}] table "
            f'with plugin = "{name}" and {required[0]} = ...'
        )
    return registration.options()


def tagged_folder(folder: Path, choice: PluginChoice, default_name: str) -> Path:
    """``folder``, or ``<folder>.<name>-<hash of its options>`` for a table's non-default choice.

    A ``[tokenizer]`` or ``[template]`` table that chooses other than the source's
    default (``default_name`` with its default options) gets a folder of its own,
    so data prepared with, say, a Korean tokenizer.json leaves the default
    preparation intact.
    """
    if not choice.from_table:
        return folder
    options = unstructure(choice.options)
    try:
        defaults = unstructure(choice.registration.options())
    except Exception:  # required options: there is no default to compare with
        defaults = None
    if choice.name == default_name and options == defaults:
        return folder
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    return folder.with_name(f"{folder.name}.{choice.name}-{digest}")


# Making the tokenizer and the template.


def make_tokenizer(choice: TokenizerChoice) -> Tokenizer:
    """A fresh tokenizer from its registration and options."""
    with plugin_call(
        plugin_who("tokenizer", choice.name, choice.registration.plugin), "its factory"
    ):
        return choice.registration.factory(choice.options)


def check_tokenizer(tokenizer: Any, choice: TokenizerChoice) -> dict[str, Any]:
    """The tokenizer's description, after checking it names this tokenizer and a vocabulary."""
    who = plugin_who("tokenizer", choice.name, choice.registration.plugin)
    description = _checked_description(tokenizer, choice, who)
    vocab = getattr(tokenizer, "vocab_size", None)
    if type(vocab) is not int or vocab <= 0 or description.get("vocab_size") != vocab:
        raise PluginError(
            f"{who}: vocab_size must be a positive integer, also in its description; got {vocab!r}"
        )
    return description


def make_template(choice: TemplateChoice) -> tuple[Template, dict[str, Any]]:
    """A template from its registration and options (:class:`Contained`), and its checked description."""
    who = plugin_who("template", choice.name, choice.registration.plugin)
    with plugin_call(who, "its factory"):
        template = choice.registration.factory(choice.options)
    return Contained(template, who), _checked_description(template, choice, who)


def _checked_description(made: Any, choice: PluginChoice, who: str) -> dict[str, Any]:
    """``made.description()``, refused unless it is a dict whose ``kind`` is the registered name."""
    with plugin_call(who, "description"):
        description = made.description()
    if not isinstance(description, dict) or description.get("kind") != choice.name:
        kind = description.get("kind") if isinstance(description, dict) else description
        raise PluginError(
            f"{who}: description() must return a dict whose 'kind' is {choice.name!r} "
            f"(the registered name), got {kind!r}"
        )
    return description
