"""How options are declared and checked, for the core and for plugins alike.

Every table of an experiment file is read into a frozen, keyword-only attrs class
whose fields are declared with :func:`option`. :func:`structure` turns a TOML table
into such a class with a *strict* cattrs converter: cattrs' defaults coerce
silently (``1.9`` becomes ``1``, ``"no"`` becomes ``True``), which hides typos in
experiment files for weeks, so here only an int may stand for a float and nothing
else is converted. Problems come back as one line each, ``path: message``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.cols import is_sequence, list_structure_factory
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from nanogpt_core.plugins.option_types import plain, register_type_hooks, show, show_type

T = TypeVar("T")

DOC_KEY = "doc"
PATH_KEY = "path"
# Metadata of a field the core fills in itself (never a key an experiment file may set).
INTERNAL_KEY = "internal"


def option(
    default: Any = attrs.NOTHING,
    doc: str = "",
    *,
    validator: Callable[[Any, attrs.Attribute, Any], None] | None = None,
    factory: Callable[[], Any] | None = None,
    path: bool = False,
) -> Any:
    """Declare one option of an attrs options class, with its documentation.

    ``doc`` is shown by ``gpt plugins`` and is the option's reference text.
    Pass ``factory`` instead of ``default`` for mutable defaults such as lists.
    ``path=True`` marks a file path or glob (``str | None`` or ``list[str]``):
    a relative value is resolved against the folder of the experiment file that
    set it, and ``~`` is expanded, so the experiment runs from any directory.
    """
    metadata: dict[str, Any] = {DOC_KEY: doc}
    if path:
        metadata[PATH_KEY] = True
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, metadata=metadata)
    return attrs.field(default=default, validator=validator, metadata=metadata)


def path_fields(cls: type) -> list[str]:
    """The names of the options of ``cls`` declared with ``option(..., path=True)``."""
    if not attrs.has(cls):
        return []
    return [field.name for field in attrs.fields(cls) if field.metadata.get(PATH_KEY)]


class OptionValueError(ValueError):
    """A value of the right type that is still not allowed: ``OptionValueError(field, message)``.

    Raise it from a validator (``field`` is ``attribute.name``) or from an options
    class's ``__attrs_post_init__`` (the name of the option at fault). The user
    sees one line, ``<file>: <table>.<field>: <message>``, and exit status 2; so
    ``message`` says what is wrong and what is allowed, e.g. ``"must be in
    [0, 1), got 1.5"``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Validators: each raises OptionValueError so the message keeps the field's name.


def positive(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: the number must be greater than zero."""
    if value is not None and value <= 0:
        raise OptionValueError(attribute.name, f"must be greater than 0, got {show(value)}")


def non_negative(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: the number must be zero or more."""
    if value is not None and value < 0:
        raise OptionValueError(attribute.name, f"must be 0 or more, got {show(value)}")


def fraction(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: a probability-like number in [0, 1)."""
    if value is not None and not 0 <= value < 1:
        raise OptionValueError(attribute.name, f"must be in [0, 1), got {show(value)}")


def one_of(*choices: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Validator: the value must be one of ``choices``."""

    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            listed = ", ".join(show(c) for c in choices)
            raise OptionValueError(attribute.name, f"expected one of {listed}, got {show(value)}")

    return check


# The strict converter.


def _strict_int(value: Any, _type: type) -> int:
    # bool is a subclass of int; `true` is never a layer count.
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {show(value)}")
    return value


def _strict_float(value: Any, _type: type) -> float:
    if type(value) is int:
        return float(value)
    if type(value) is not float:
        raise TypeError(f"expected a float, got {show(value)}")
    # TOML allows nan and inf; no option means them, and a nan learning rate
    # would only show up as a nan loss hours later.
    if not math.isfinite(value):
        raise TypeError(f"expected a finite number, got {show(value)}")
    return value


def _strict_bool(value: Any, _type: type) -> bool:
    if type(value) is not bool:
        raise TypeError(f"expected true or false, got {show(value)}")
    return value


def _strict_str(value: Any, _type: type) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {show(value)}")
    return value


def make_converter() -> cattrs.Converter:
    """Build the strict converter used for every table of an experiment file."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook(str, _strict_str)

    # cattrs turns any iterable into a list, so "abc" would become ["a", "b", "c"].
    def strict_list_factory(type_: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
        inner = list_structure_factory(type_, conv)

        def structure_list(value: Any, type_: Any) -> Any:
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {show(value)}")
            return inner(value, type_)

        return structure_list

    converter.register_structure_hook_factory(is_sequence, strict_list_factory)
    # Tuples, literals, enums, paths and dict[str, X] (registered later, so they win).
    register_type_hooks(converter)

    # Without this, `train = []` or `[[model]]` reaches cattrs' generated code and
    # fails with an AttributeError about `.keys()` instead of naming the table.
    def strict_table_factory(cls: type) -> Callable[[Any, Any], Any]:
        internal = internal_fields(cls)
        if internal:
            # Not read from the file: its key is an unknown key like any other.
            inner = make_dict_structure_fn(
                cls,
                converter,
                _cattrs_forbid_extra_keys=True,
                _cattrs_detailed_validation=True,
                **{name: override(omit=True) for name in internal},
            )
        else:
            inner = converter.gen_structure_attrs_fromdict(cls)

        def structure_table(value: Any, type_: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected a table, got {show(value)}")
            return inner(value, type_)

        return structure_table

    converter.register_structure_hook_factory(attrs.has, strict_table_factory)

    # Internal fields are not part of the table as written, so not part of it as read back.
    def table_unstructure_factory(cls: type) -> Callable[[Any], Any]:
        internal = internal_fields(cls)
        if not internal:
            return converter.gen_unstructure_attrs_fromdict(cls)
        omitted = {name: override(omit=True) for name in internal}
        return make_dict_unstructure_fn(cls, converter, **omitted)

    converter.register_unstructure_hook_factory(attrs.has, table_unstructure_factory)
    return converter


def internal_fields(cls: type) -> list[str]:
    """Fields of ``cls`` the core fills in itself: never read from, nor written to, a table."""
    return [field.name for field in attrs.fields(cls) if field.metadata.get(INTERNAL_KEY)]


def structure(data: Any, cls: type[T], path: str = "") -> T:
    """Read ``data`` (a TOML table) into ``cls``, raising :class:`OptionProblems`."""
    converter = make_converter()
    try:
        return converter.structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        raise OptionProblems(list(describe(exc, path))) from exc


def unstructure(instance: Any) -> Any:
    """Turn an options instance back into plain JSON data: what ``config.json`` holds.

    Tuples become lists, enums their values and paths strings (:func:`plain`), so
    the value read back from ``config.json`` compares equal to it.
    """
    return plain(make_converter().unstructure(instance))


class OptionProblems(ValueError):
    """The problems found while structuring one table, each ``path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def join(path: str, key: str | int) -> str:
    """Extend a dotted option path: ``join("train", "lr")`` is ``"train.lr"``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def suggest(word: str, candidates: Sequence[str]) -> str:
    """A ' (did you mean "x"?)' hint, or an empty string when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def describe(exc: BaseException, path: str) -> Iterator[str]:
    """Flatten a cattrs/attrs exception tree into ``path: message`` lines."""
    if isinstance(exc, IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from describe(sub, join(path, note.index))
        for sub in without:
            yield from describe(sub, path)
    elif isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from describe(sub, join(path, note.name))
        for sub in without:
            yield from describe(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        hidden = internal_fields(exc.cl)
        known = [a.name for a in attrs.fields(exc.cl) if a.name not in hidden]
        for key in sorted(exc.extra_fields):
            yield f"{join(path, key)}: unknown key{suggest(key, known)}"
    elif isinstance(exc, OptionValueError):
        yield f"{join(path, exc.field)}: {exc.message}"
    elif isinstance(exc, KeyError):
        yield f"{path}: missing required key"
    elif isinstance(exc, (TypeError, ValueError)):
        yield f"{path}: {exc}" if path else str(exc)
    else:
        raise exc


def describe_fields(cls: type) -> list[dict[str, Any]]:
    """Each option of an attrs class: name, type, default and documentation."""
    fields = []
    for field in attrs.fields(cls):
        if field.default is attrs.NOTHING:
            default: Any = None
            required = True
        elif isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            default = field.default.factory()
            required = False
        else:
            default = field.default
            required = False
        fields.append(
            {
                "name": field.name,
                # A string until the registration check resolved it: the annotation as written.
                "type": field.type if isinstance(field.type, str) else show_type(field.type),
                # As config.json would hold it: an enum's value, a path's string.
                "default": unstructure(default),
                "required": required,
                "doc": field.metadata.get(DOC_KEY, ""),
            }
        )
    return fields
