"""Run a function on N CPU processes joined by torch.distributed (gloo), for the tests.

run_ranks(worker, world_size, *args) starts world_size spawned processes, each calling
worker(rank, world_size, *args) after init_process_group("gloo") on a free local port,
and returns their return values by rank. Any rank that raises makes run_ranks raise
RankFailed with that rank's traceback (the others are killed); a run not done within
`timeout` seconds is killed and raises TimeoutError, so a hang fails a test instead of
blocking the suite. `worker` must be a module-level function of an importable module.
"""
from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


class RankFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out: str, module: str, name: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share the machine's cores
    # what torchrun sets: transformers/accelerate read it (TrainingArguments.world_size)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    path = Path(out)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        try:
            result = getattr(importlib.import_module(module), name)(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, path / f"rank{rank}.pt")
    except BaseException:
        (path / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # The result is written and the process group destroyed: leave without the
    # interpreter's teardown, where a c10d thread still being joined can abort the process
    # ("terminate called without an active exception", exit code -6) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, world_size: int, *args, timeout: float = 240.0) -> list:
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(rank, world_size, port, out, worker.__module__, worker.__name__,
                                                  args), daemon=True) for rank in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                errors = sorted(Path(out).glob("rank*.err"))
                if errors:
                    time.sleep(0.5)  # let the others write theirs
                    errors = sorted(Path(out).glob("rank*.err"))
                    raise RankFailed("\n".join(f"{e.stem}:\n{e.read_text()}" for e in errors))
                if all(not p.is_alive() for p in procs):
                    break
                time.sleep(0.05)
            else:
                raise TimeoutError(f"{world_size} ranks of {worker.__name__} still running after {timeout:.0f} s")
            bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
            if bad:
                raise RankFailed(f"ranks exited with codes {bad} without a traceback")
            return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between same-named tensors of two dicts."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def fraction_close(a: dict, b: dict, atol: float) -> float:
    """The fraction of all entries of a's tensors within atol of b's."""
    close = sum(int(((a[k] - b[k]).abs() <= atol).sum()) for k in a)
    return close / sum(a[k].numel() for k in a)


def check_ranks_follow(case: dict, per_rank: list[dict], reference: dict, untrained: dict, tol: float,
                       rounded: float, lr: float) -> None:
    """N ranks' results ({"weights", "losses"}) against the one-process run of `case`:
    the ranks bit-identical, each within `tol` of `reference` (when tol is the `rounded`
    bound of the bf16 modes, also 99% of the entries within lr / 20), training moved the
    weights from `untrained`, and the ranks' losses sum to the one-process loss."""
    import pytest

    for rank, got in enumerate(per_rank):
        assert max_diff(got["weights"], per_rank[0]["weights"]) == 0, f"rank {rank} differs from rank 0"
        diff = max_diff(got["weights"], reference["weights"])
        assert diff <= tol, f"{case}: rank {rank} is {diff:.3g} from the one-process run (bound {tol:.3g})"
        if tol == rounded:
            assert fraction_close(got["weights"], reference["weights"], lr / 20) >= 0.99
    moved = max_diff(reference["weights"], untrained["weights"])
    assert moved > (1e-4 if tol == rounded else 100 * tol), "training must move the weights"
    summed = [sum(values) for values in zip(*(r["losses"] for r in per_rank))]
    assert summed == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
