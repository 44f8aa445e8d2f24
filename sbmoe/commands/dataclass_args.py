"""Flags from a dataclass (dashes, help with defaults, ``--x/--no-x`` booleans) and the same dataclass from JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from sbmoe.data import DataError

T = TypeVar("T")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, groups: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Add one ``--field-name`` flag per field of ``cls``, typed and described by its annotation and metadata.

    A field without a default is a required flag. ``groups`` (title -> field names) lists the flags under those
    titles in ``--help``, in that order; fields no group names come last, under "other".
    """
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    grouped = {name: title for title, names in (groups or {}).items() for name in names}
    sections = {title: parser.add_argument_group(title) for title in (groups or {})}
    if groups and set(fields) - set(grouped):
        sections["other"] = parser.add_argument_group("other")
    for field in fields.values():
        section = sections.get(grouped.get(field.name, "other"), parser)
        _add_field(section, field, hints[field.name])


def _add_field(parser: argparse._ActionsContainer, field: dataclasses.Field, hint: Any) -> None:
    """The flag of one dataclass field (see :func:`add_dataclass_arguments`)."""
    flag = "--" + field.name.replace("_", "-")
    help_text = field.metadata.get("help", "")
    kind, _ = _unwrap(hint)
    required = field.default is dataclasses.MISSING
    if kind is bool:
        help_text += f" (default: {'--' if field.default else '--no-'}{flag[2:]})"
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        return
    options: dict[str, Any] = {"dest": field.name, **({"required": True} if required else {"default": field.default})}
    if typing.get_origin(kind) is Literal:
        options["choices"] = typing.get_args(kind)
    else:
        options["type"] = kind
        options["metavar"] = field.name.split("_")[-1].upper()
    if not required and "default" not in help_text:
        help_text += f" (default: {field.default if field.default not in (None, '') else 'none'})"
    parser.add_argument(flag, help=help_text + (" (required)" if required else ""), **options)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(hint, False)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def from_json_file(cls: type[T], path: str | Path) -> T:
    """An instance of ``cls`` from a JSON object of its field names (the ``arguments`` of a ``run.json`` work too).

    Raises:
        DataError: the file is missing or not a JSON object, or names a field ``cls`` does not have.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as err:
        raise DataError(f"{path}: config file not found") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON at column {err.colno} ({err.msg})") from err
    if isinstance(values, dict) and isinstance(values.get("arguments"), dict):
        values = values["arguments"]
    if not isinstance(values, dict):
        raise DataError(f"{path}: expected a JSON object of argument names and values")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"{path}: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)
