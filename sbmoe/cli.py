"""The ``sbmoe`` command: one sub-command per job; each parses its own flags and delegates to the library."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS = {
    "index": ("sbmoe.commands.index", "encode a corpus, index it with faiss, store its texts"),
    "search": ("sbmoe.commands.search", "search an index folder: a ranked table, JSON, or a TREC run file"),
    "evaluate": ("sbmoe.commands.evaluate", "score a model or a run file on BEIR / ir-datasets qrels"),
    "finetune": ("sbmoe.commands.finetune", "train an SB-MoE, dense or no head (alone or with the backbone)"),
    "quantize": ("sbmoe.commands.quantize", "quantize a model's experts to a bit budget and save them packed"),
    "demo": ("sbmoe.commands.demo", "fine-tune heads on SciFact, index, search and print an honest table"),
}
RESUME = {  # what an interrupted command keeps, and how to continue
    "index": "resume with the same command (the documents encoded so far are cached)",
    "finetune": "resume with the same command plus --resume",
    "evaluate": "resume with the same command (the documents encoded so far are cached)",
}
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
USAGE = "usage: sbmoe [--debug] {" + ",".join(COMMANDS) + "} ... (sbmoe COMMAND --help for its flags)"
EXAMPLES = """examples:
  sbmoe index --model minilm --corpus my_docs.jsonl --output indexes/my_docs
  sbmoe search indexes/my_docs "what causes glioblastoma"
  sbmoe evaluate --model minilm --datasets scifact"""


def help_text() -> str:
    """``sbmoe --help``: the sub-commands and a few examples."""
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "Dense retrieval with Mixture-of-Experts heads.", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join([*lines, "", EXAMPLES])


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``sbmoe [--debug] COMMAND ARGS``; returns the command's exit code.

    Codes: 0 done, 1 an error the user can fix (one line) or a bug (one line saying so; ``--debug`` or
    ``SBMOE_DEBUG=1`` shows its traceback), 2 bad flags or an unknown command, 130 interrupted (Ctrl-C).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv and argv[0] == "--debug") or os.environ.get("SBMOE_DEBUG", "") not in ("", "0")
    argv = argv[1:] if argv and argv[0] == "--debug" else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\nsbmoe: error: unknown command {name!r}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return module.main(rest, prog=f"sbmoe {name}") or 0
    except KeyboardInterrupt:
        hint = RESUME.get(name)
        print(f"sbmoe {name}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # anything the commands do not catch as the user's to fix is a bug
        if debug:
            raise
        what = (str(err).strip().splitlines() or [""])[0]
        print(
            f"sbmoe {name}: internal error, a bug in sbmoe ({type(err).__name__}: {what}); please report it with "
            f"the traceback that `sbmoe --debug {name} ...` prints",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
