"""``python -m sbmoe.finetune``: the same as ``sbmoe finetune`` (see :mod:`sbmoe.commands.finetune`)."""

import sys

from sbmoe.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sbmoe.finetune"))
