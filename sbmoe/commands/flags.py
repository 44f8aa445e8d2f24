"""An argument parser that names a misspelled flag (with the closest real one) before anything else it finds wrong,
so ``--modle x`` says ``unrecognized flag --modle (did you mean --model?)``, not that ``--model`` is required."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from difflib import get_close_matches
from typing import Any

from sbmoe.commands.common import description, epilog


class FlagParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that checks every ``--flag`` it is given against its own flags first."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        for given in _flags(args):
            if not any(known.startswith(given) for known in self._option_string_actions):
                close = get_close_matches(given, list(self._option_string_actions), n=1)
                self.error(f"unrecognized flag {given}" + (f" (did you mean {close[0]}?)" if close else ""))
        return super().parse_known_args(args, namespace)


def _flags(args: Sequence[str] | None) -> list[str]:
    """The ``--name`` part of each long flag in ``args`` (``None``: the command line), up to a ``--``."""
    tokens = list(sys.argv[1:] if args is None else args)
    if "--" in tokens:
        tokens = tokens[: tokens.index("--")]
    return [token.split("=", 1)[0] for token in tokens if token.startswith("--") and len(token) > 2]


def new_parser(prog: str, doc: str, examples: Sequence[str]) -> FlagParser:
    """A :class:`FlagParser` described by the command's module docstring ``doc``, whose ``--help`` ends with
    examples."""
    return FlagParser(
        prog=prog,
        description=description(doc),
        epilog=epilog(examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
