"""`python -m seat.demo`: the synthetic abstention world, every fine-tuning method, one table.
See seat/demo/run.py (the ops-level tour is `python -m seat.demo.ops_tour`)."""
import sys

from .run import main

sys.exit(main())
