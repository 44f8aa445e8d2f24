"""The commands' argument parser: ``transformers.HfArgumentParser`` (dataclasses -> flags, one help group per
dataclass, the same dataclasses from a JSON file), with dashed flags, ``--x/--no-x`` booleans, each flag's default
in its help, and a misspelled flag named (with the closest real one) before anything else it finds wrong, so
``--modle x`` says ``unrecognized flag --modle (did you mean --model?)``, not that ``--model`` is required."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser

from sbmoe.commands.common import description, epilog
from sbmoe.data import DataError


class FlagParser(HfArgumentParser):
    """``HfArgumentParser`` that checks every ``--flag`` it is given against its own flags first."""

    @staticmethod
    def _parse_dataclass_field(parser: argparse._ActionsContainer, field: dataclasses.Field) -> None:
        """One dataclass field's flag: ``--field-name`` only (HfArgumentParser would add ``--field_name`` too),
        booleans as ``--x/--no-x`` whatever their default, help ending with the default (or ``(required)``)."""
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        kind = _unwrap_optional(field.type)
        required = field.default is dataclasses.MISSING
        if kind is bool:
            help_text += f" (default: {'--' if field.default else '--no-'}{flag[2:]})"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
            return
        options: dict[str, Any] = {"dest": field.name}
        options.update({"required": True} if required else {"default": field.default})
        if typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        else:
            options["type"] = kind
            options["metavar"] = field.name.split("_")[-1].upper()
        if not required and "default" not in help_text:
            help_text += f" (default: {field.default if field.default not in (None, '') else 'none'})"
        parser.add_argument(flag, help=help_text + (" (required)" if required else ""), **options)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        for given in _flags(args):
            if not any(known.startswith(given) for known in self._option_string_actions):
                close = get_close_matches(given, list(self._option_string_actions), n=1)
                self.error(f"unrecognized flag {given}" + (f" (did you mean {close[0]}?)" if close else ""))
        return super().parse_known_args(args, namespace)

    def parse_flags(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """One instance of each dataclass from the command line (argparse's error for a stray argument)."""
        *groups, rest = self.parse_args_into_dataclasses(args, return_remaining_strings=True, look_for_args_file=False)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return tuple(groups)

    def parse_json_config(self, path: str | Path) -> tuple[Any, ...]:
        """One instance of each dataclass from a JSON object of field names (the ``arguments`` of a ``run.json``
        work too), by ``parse_dict``.

        Raises:
            DataError: the file is missing or not a JSON object, or names a field no dataclass has.
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
        known = {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"{path}: unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return self.parse_dict(values)


def _unwrap_optional(hint: Any) -> Any:
    """``X | None`` -> ``X``; anything else as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _flags(args: Sequence[str] | None) -> list[str]:
    """The ``--name`` part of each long flag in ``args`` (``None``: the command line), up to a ``--``."""
    tokens = list(sys.argv[1:] if args is None else args)
    if "--" in tokens:
        tokens = tokens[: tokens.index("--")]
    return [token.split("=", 1)[0] for token in tokens if token.startswith("--") and len(token) > 2]


def new_parser(prog: str, doc: str, examples: Sequence[str], dataclass_types: Sequence[type] = ()) -> FlagParser:
    """A :class:`FlagParser` with the flags of ``dataclass_types`` (each under its ``_argument_group_name``, if
    any), described by the command's module docstring ``doc``, whose ``--help`` ends with examples."""
    return FlagParser(
        dataclass_types,
        prog=prog,
        description=description(doc),
        epilog=epilog(examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
