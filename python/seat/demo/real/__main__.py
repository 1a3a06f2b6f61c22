"""`python -m seat.demo.real`: see seat/demo/real/run.py."""
import sys

from .run import main

sys.exit(main())
