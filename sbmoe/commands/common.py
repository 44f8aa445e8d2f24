"""What the sub-commands share: parsers with examples, index parameters, output names, one way to fail."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from sbmoe.backbones import BackboneUnavailableError
from sbmoe.errors import SbmoeError

# Errors a user can fix (a missing file, a malformed line, an unreachable model): one line on stderr, exit 1.
USER_ERRORS = (SbmoeError, BackboneUnavailableError, OSError)


def description(doc: str) -> str:
    """A command's description: the first line of its module docstring, after ``sbmoe NAME``: ."""
    return doc.splitlines()[0].split(": ", 1)[1]


def epilog(examples: Sequence[str]) -> str:
    """The end of a command's ``--help``: its examples."""
    return "examples:\n" + "\n".join(f"  {example}" for example in examples)


def index_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["nprobe=32", ...]`` -> ``{"nprobe": 32}``; raises ArgumentTypeError naming the bad pair."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--index-param {pair!r}: expected KEY=INTEGER, e.g. nprobe=32")
        params[key] = int(value)
    return params


def add_index_arguments(parser: argparse.ArgumentParser, index_types: Sequence[str]) -> None:
    """``--index`` and ``--index-param``."""
    parser.add_argument("--index", default="flat", choices=index_types, help="index type (default: flat, exact)")
    parser.add_argument(
        "--index-param",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="index parameter, repeatable: nprobe=32, ef_search=512, nlist=1024, ...",
    )


def setup_logging(level: int = logging.INFO, format: str = "%(name)s: %(message)s") -> None:
    """Log ``sbmoe`` messages at ``level``; other libraries only from WARNING up (their INFO is noise to a user)."""
    logging.basicConfig(level=logging.WARNING, format=format)
    logging.getLogger("sbmoe").setLevel(level)


def slug(text: str) -> str:
    """A file-name-safe form of a model or dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def fail(command: str, err: Exception) -> int:
    """Print ``sbmoe COMMAND: error: ...`` to stderr and return exit code 1."""
    print(f"sbmoe {command}: error: {err}", file=sys.stderr)
    return 1
