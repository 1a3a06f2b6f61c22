"""The `seat` command: train, eval, merge, memory, info.

  seat train    fine-tune a causal LM on a facts file with SEAT (seat.cli.train)
  seat merge    base model + delta -> one model folder (seat.cli.merge)
  seat eval     IDK rate / ROUGE-L recall / exact match (python -m seat.evaluate)
  seat memory   predicted peak memory of a run (python -m seat.memory)
  seat info     versions, devices, backends (python -m seat.info)

`main(argv)` returns the exit code: 0 done, 2 a bad argument (a message naming it and the
fix, no traceback), 130 interrupted (Ctrl-C or SIGTERM). eval, memory and info hand their arguments to those
modules' own main unchanged. Importing this module loads neither torch nor transformers.
"""
from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from . import merge, train
from ._options import UsageError

__all__ = ["main", "build_parser", "UsageError"]


def _evaluate(argv):
    from ..evaluate import main as run
    return run(argv)


def _memory(argv):
    from ..memory.__main__ import main as run
    return run(argv)


def _info(argv):
    from ..info import main as run
    return run(argv)


# command -> (its main, the help line); their parsers are their modules' own
DELEGATED = {
    "eval": (_evaluate, "IDK rate, ROUGE-L recall and exact match of a model on a JSONL of questions "
                        "(python -m seat.evaluate; `seat eval --help`)"),
    "memory": (_memory, "predicted peak memory of SEAT and other methods for a model config "
                        "(python -m seat.memory; `seat memory --help`)"),
    "info": (_info, "versions, devices and kernel backends (python -m seat.info)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """(the `seat` parser, its own subcommand parsers by name)."""
    parser = argparse.ArgumentParser(prog="seat", description="SEAT fine-tuning from the command line: sparse "
                                     "updates + entity-perturbation KL (arXiv 2506.14387).")
    parser.add_argument("--version", action="version", version=f"seat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    own = {"train": train.add_parser(sub), "merge": merge.add_parser(sub)}
    for name, (_, help_line) in DELEGATED.items():
        sub.add_parser(name, help=help_line, add_help=False)
    own["train"].usage = "seat train --model DIR_OR_ID --data FILE --output-dir DIR [options]"
    return parser, own


def _terminated(signum, frame):
    raise KeyboardInterrupt  # a job scheduler's SIGTERM: clean up (merge's temporary folder) as after Ctrl-C


def main(argv=None) -> int:
    import signal
    import threading

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() only works there
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `seat ... | head`: the reader left; no traceback about it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        return int(DELEGATED[argv[0]][0](argv[1:]) or 0)
    parser, own = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command = own[args.command]
    try:
        return int(args.command_main(args, command) or 0)
    except UsageError as e:
        command.error(str(e))  # prints the usage and the message, exits with 2
    except KeyboardInterrupt:
        print(f"\nseat {args.command}: interrupted." + (
            " Run the same command again to continue from the newest checkpoint-N in --output-dir "
            "(--resume auto)." if args.command == "train" else ""), file=sys.stderr)
        return 130
