"""The types an option may have, read strictly from TOML and written back as plain JSON.

An option's value goes TOML -> options class (:func:`register_type_hooks`'
structure hooks) -> ``config.json`` (:func:`plain`) -> compared with the next
run's on resume. Every type here survives that trip and compares equal:
``int``, ``float``, ``bool``, ``str``, ``X | None``, ``Literal[...]``, an
``enum.Enum`` of plain values, a ``pathlib`` path, ``list[X]``, ``tuple[X, Y]``,
``tuple[X, ...]``, ``dict[str, X]`` and a nested attrs class, nested freely.
A tuple is written as a JSON array and read back as a tuple; an enum as its
value; a path as its string. A type outside this set (a ``set``, ``Any``, a
union of two types, a class of the plugin's own) is refused when the plugin
registers (:func:`unsupported_option_type`), not on the second run.
"""

from __future__ import annotations

import enum
import json
import pathlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import cattrs
from cattrs.errors import IterableValidationError, IterableValidationNote

# What TOML scalars, and so option values, are: the values a Literal or an enum may hold.
PLAIN_SCALARS = (str, int, float, bool)


def show(value: Any) -> str:
    """Render a value the way the user wrote it in TOML (strings quoted, true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _same_scalar(value: Any, choice: Any) -> bool:
    # `1 == True` and `1 == 1.0` in Python; in a TOML file they are different values.
    return type(value) is type(choice) and value == choice


def _choices(values: list[Any]) -> str:
    return ", ".join(show(v) for v in values)


def _is_tuple(type_: Any) -> bool:
    return typing.get_origin(type_) is tuple or type_ is tuple


def _is_dict(type_: Any) -> bool:
    return type_ is dict or typing.get_origin(type_) in (dict, Mapping)


def _is_literal(type_: Any) -> bool:
    return typing.get_origin(type_) is typing.Literal


def _is_enum(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, enum.Enum)


def _is_path(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, pathlib.PurePath)


def register_type_hooks(converter: cattrs.Converter) -> None:
    """Strict structure hooks for tuples, literals, enums, paths and typed tables.

    cattrs' own hooks accept any iterable for a tuple (``"ab"`` becomes
    ``("a", "b")``), raise an error outside its validation tree for a literal,
    and pass a ``dict[str, X]``'s values through unchecked; these do not.
    """

    def items(pairs: list[tuple[Any, Any, Any]], type_: Any) -> list[Any]:
        # Each (index or key, value, type) structured; every failure is kept, with
        # its index or key noted, so describe() names each as `path[1]` or `path.key`.
        done, errors = [], []
        for index, value, arg in pairs:
            try:
                done.append(converter.structure(value, arg))
            except Exception as exc:
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    IterableValidationNote(f"Structuring {type_} @ {index!r}", index, arg),
                ]
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {show_type(type_)}", errors, type_)
        return done

    def tuple_factory(type_: Any) -> Callable[[Any, Any], Any]:
        args = typing.get_args(type_)
        variadic = len(args) == 2 and args[1] is Ellipsis

        def structure_tuple(value: Any, type_: Any) -> tuple:
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {show(value)}")
            if variadic:
                return tuple(items([(i, v, args[0]) for i, v in enumerate(value)], type_))
            if len(value) != len(args):
                raise TypeError(f"expected an array of {len(args)} values, got {len(value)}")
            return tuple(
                items([(i, *pair) for i, pair in enumerate(zip(value, args, strict=True))], type_)
            )

        return structure_tuple

    def literal(value: Any, type_: Any) -> Any:
        choices = list(typing.get_args(type_))
        if not any(_same_scalar(value, choice) for choice in choices):
            raise TypeError(f"expected one of {_choices(choices)}, got {show(value)}")
        return value

    def enum_member(value: Any, type_: Any) -> Any:
        for member in type_:
            if _same_scalar(value, member.value):
                return member
        raise TypeError(f"expected one of {_choices([m.value for m in type_])}, got {show(value)}")

    def path(value: Any, type_: Any) -> Any:
        if type(value) is not str:
            raise TypeError(f"expected a path (a string), got {show(value)}")
        return type_(value)

    def mapping(value: Any, type_: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected a table, got {show(value)}")
        args = typing.get_args(type_)
        if not args or args[1] is Any:  # a bare dict holds the table as written
            return value
        keys = items([(k, k, args[0]) for k in value], type_)
        values = items([(k, v, args[1]) for k, v in value.items()], type_)
        return dict(zip(keys, values, strict=True))

    converter.register_structure_hook_func(_is_dict, mapping)
    converter.register_structure_hook_factory(_is_tuple, tuple_factory)
    converter.register_structure_hook_func(_is_literal, literal)
    converter.register_structure_hook_func(_is_enum, enum_member)
    # Older cattrs (24.1) dispatch enums by class before any predicate: hook the base too.
    converter.register_structure_hook(enum.Enum, enum_member)
    for path_type in (pathlib.PurePath, pathlib.Path):  # cattrs has its own hook for Path
        converter.register_structure_hook(path_type, path)


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back: tuples as lists, enums as their values, paths as strings.

    Applied to what is written to ``config.json`` and to both sides of a resume's
    comparison, so an option compares equal to itself read back.
    """
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


_SCALARS = (int, float, bool, str, type(None))
_SEQUENCES = (list, tuple)


def type_problem(type_: Any, seen: frozenset[type] = frozenset()) -> str | None:
    """Why values of ``type_`` cannot go to ``config.json`` and back unchanged, or None."""
    origin, args = typing.get_origin(type_), typing.get_args(type_)
    if type_ is None:
        return "it has no type annotation"
    if type_ in _SCALARS or _is_path(type_):
        return None
    if _is_literal(type_):
        odd = [a for a in args if type(a) not in PLAIN_SCALARS]
        return (
            f"Literal values must be strings, numbers or booleans, not {odd[0]!r}" if odd else None
        )
    if _is_enum(type_):
        odd = [m for m in type_ if type(m.value) not in PLAIN_SCALARS]
        return f"{type_.__name__}.{odd[0].name}'s value is not a string or number" if odd else None
    if attrs.has(type_):
        return None if type_ in seen else fields_problem(type_, seen | {type_})
    if origin is typing.Union or origin is types.UnionType:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            return f"{show_type(type_)} is a union; only X | None is read back unambiguously"
        return type_problem(others[0], seen)
    if origin in _SEQUENCES and args:
        members = args[:1] if origin is list or args[-1] is Ellipsis else args
        return next((p for p in (type_problem(a, seen) for a in members) if p), None)
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            return f"{show_type(type_)}: table keys are strings; use dict[str, ...]"
        return type_problem(args[1], seen)
    if type_ in (list, tuple, dict) or type_ is Any:
        return f"{show_type(type_)} does not say what it holds; e.g. list[str], dict[str, int]"
    return f"{show_type(type_)} cannot be written to config.json and read back"


def show_type(type_: Any) -> str:
    """A type as its annotation reads: ``tuple[float, float]``, ``Path | None``."""
    origin, args = typing.get_origin(type_), typing.get_args(type_)
    if type_ is type(None):
        return "None"
    if type_ is Ellipsis:
        return "..."
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(show_type(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(show_type(a) for a in args)}]"
    return getattr(type_, "__name__", None) or str(type_).replace("typing.", "")


def fields_problem(cls: type, seen: frozenset[type] = frozenset()) -> str | None:
    """``option 'x': why`` for the first option of ``cls`` whose type cannot round-trip."""
    try:
        attrs.resolve_types(cls)
    except Exception as exc:  # a name the annotations use that the module lacks
        return f"its option types cannot be read ({type(exc).__name__}: {exc})"
    for field in attrs.fields(cls):
        problem = type_problem(field.type, seen | {cls})
        if problem:
            return f"option {field.name!r} of type {show_type(field.type)}: {problem}"
    return None
