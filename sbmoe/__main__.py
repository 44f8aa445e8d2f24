"""``python -m sbmoe COMMAND ...``: the same as the ``sbmoe`` command (see :mod:`sbmoe.cli`)."""

import sys

from sbmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
