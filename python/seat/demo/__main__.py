"""`python -m seat.demo`: the synthetic abstention world, every fine-tuning method, one table.
See seat/demo/run.py (the ops-level tour is `python -m seat.demo.ops_tour`).

`python -m seat.demo --world smollm2 [...]` runs the real-model world instead
(seat/demo/real/run.py, also `python -m seat.demo.real`); `--world toy` is the default."""
import sys


def _world(argv: list[str]) -> tuple[str, list[str]]:
    """(world, the other arguments): --world is read here, the rest goes to that world's CLI."""
    rest, world, i = [], "toy", 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--world" and i + 1 < len(argv):
            world, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--world="):
            world = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return world, rest


world, args = _world(sys.argv[1:])
if world == "toy":
    from .run import main
elif world == "smollm2":
    from .real.run import main
else:
    sys.exit(f"python -m seat.demo: --world must be 'toy' (the synthetic world) or 'smollm2' (SmolLM2-135M-Instruct); "
             f"got {world!r}")
sys.exit(main(args))
