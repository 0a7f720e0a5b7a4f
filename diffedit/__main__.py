"""`python -m diffedit`: the same command as `diffedit`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="diffedit"))
