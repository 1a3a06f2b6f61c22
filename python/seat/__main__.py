"""`python -m seat`: the `seat` command (seat.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
