"""``python -m sbmoe.evaluate``: the same as ``sbmoe evaluate`` (see :mod:`sbmoe.commands.evaluate`)."""

import sys

from sbmoe.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sbmoe.evaluate"))
