"""Fault injection into save_delta: every step of its write sequence (each call of
os.replace, os.fsync, os.unlink, os.mkdir, os.rmdir, open and safetensors' save_file)
raises, or the saving process is killed (SIGKILL) before it or in the middle of a file
write. Afterwards the path loads as the old delta when the fault came before the commit
point (the rename of seat_config.json) and as the new one after it, never as neither;
reading changes nothing, and the next save leaves exactly the two delta files.

The old state is: none (a new path), an empty directory, a format 3 delta, a format 2
delta written by seat 0ec13a8 (tests/api/data/v0ec13a8), a format 3 delta with the
leftovers of a save killed before its commit point, or a save stopped after its commit
point (which the next save rolls forward: faults in that recovery are injected too)."""
from __future__ import annotations

import builtins
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from _delta_helpers import DELTA_FILES, listing, loaded, patched, snapshot, step

safetensors_torch = pytest.importorskip("safetensors.torch")

LEGACY = Path(__file__).parents[1] / "api" / "data" / "v0ec13a8" / "delta-int32"
OLD_STATES = ("new path", "empty directory", "format 3", "format 2", "leftovers", "interrupted after commit")
# every call the write sequence makes to the file system: (module, attribute)
STEPS = ((os, "replace"), (os, "fsync"), (os, "unlink"), (os, "mkdir"), (os, "rmdir"), (builtins, "open"),
         (safetensors_torch, "save_file"))


class InjectedFault(OSError):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The handle to save (its new delta) and the old states it saves over, with the
    parameters each loads as: a format 3 delta of an earlier step; the format 2 delta of
    the same base model; that format 3 delta with the leftovers of a save killed before
    its commit point (a temporary, an uncommitted pending file); and the state of a save
    stopped after its commit point (new config, old weights, the new weights pending)."""
    model, handle = patched("int32")
    templates = tmp_path_factory.mktemp("templates")
    step(handle, seed=0)
    handle.save_delta(templates / "format 3")
    shutil.copytree(LEGACY, templates / "format 2")
    shutil.copytree(templates / "format 3", templates / "leftovers")
    (templates / "leftovers" / ".seat-tmp-0123456789abcdef").write_bytes(b"half a file")
    shutil.copy(LEGACY / "delta.safetensors", templates / "leftovers" / "delta.safetensors.pending")
    step(handle, seed=1)
    shutil.copytree(templates / "format 3", templates / "interrupted after commit")
    real_replace = os.replace

    def no_roll_forward(src, dst):
        if Path(src).name == "delta.safetensors.pending":
            raise InjectedFault("stopped after the commit point")
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "replace", no_roll_forward)
        with pytest.raises(InjectedFault):
            handle.save_delta(templates / "interrupted after commit")
    assert listing(templates / "interrupted after commit") == [*DELTA_FILES[:1], "delta.safetensors.pending",
                                                                 DELTA_FILES[1]]
    step(handle, seed=2)
    params = {state: loaded(templates / state) for state in OLD_STATES[2:]}
    assert not any(all(torch.equal(p, q[n]) for n, p in params["format 3"].items())
                   for q in (params["format 2"], params["interrupted after commit"]))
    assert all(torch.equal(p, params["leftovers"][n]) for n, p in params["format 3"].items())
    return {"handle": handle, "new": snapshot(model), "templates": templates, "old": params}


def _prepare(run, tmp_path, state: str) -> Path:
    path = tmp_path / "delta"
    if state == "empty directory":
        path.mkdir()
    elif state != "new path":
        shutil.copytree(run["templates"] / state, path)
    return path


def _instrument(setattr_, before_call) -> None:
    """Route every STEPS call through before_call(index, step name, args) first."""
    counter = [0]
    for module, name in STEPS:
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            index = counter[0]
            counter[0] += 1
            return before_call(index, _name, args, lambda: _real(*args, **kwargs))

        setattr_(module, name, wrapper)


def _sequence(run, tmp_path, state: str, monkeypatch) -> tuple[list[tuple[str, list[str]]], int]:
    """The write sequence's calls (name, args as str) for a save over `state`, and the
    index of the commit point (the rename onto seat_config.json)."""
    (tmp_path / "dry").mkdir()
    path = _prepare(run, tmp_path / "dry", state)
    calls = []

    def record(index, name, args, call):
        calls.append((name, [str(a) if isinstance(a, (str, int, os.PathLike)) else type(a).__name__ for a in args]))
        return call()

    with monkeypatch.context() as m:
        _instrument(m.setattr, record)
        run["handle"].save_delta(path)
    commit = [i for i, (name, args) in enumerate(calls)
              if name == "replace" and Path(args[1]).name == "seat_config.json"]
    assert len(commit) == 1, calls
    return calls, commit[0]


def _expected(run, state: str, index: int, commit: int):
    """What the path must load as after a fault at call `index`: None for no delta."""
    if index > commit:
        return run["new"]
    return run["old"].get(state)


def _check_loads_as(path: Path, expected) -> None:
    if expected is None:
        with pytest.raises(FileNotFoundError):
            loaded(path)
        return
    names = listing(path)
    params = loaded(path)
    assert listing(path) == names  # reading changes nothing
    assert all(torch.equal(params[n], expected[n]) for n in expected)


def _check_next_save_cleans_up(run, path: Path) -> None:
    run["handle"].save_delta(path)
    assert listing(path) == DELTA_FILES
    params = loaded(path)
    assert all(torch.equal(params[n], run["new"][n]) for n in params)


@pytest.mark.parametrize("state", OLD_STATES)
def test_an_exception_at_any_step_leaves_the_old_or_the_new_delta(run, tmp_path, monkeypatch, state):
    calls, commit = _sequence(run, tmp_path, state, monkeypatch)
    assert {"save_file", "replace", "fsync", "open"} <= {name for name, _ in calls}
    for fault_at, (call_name, _) in enumerate(calls):
        for exc in (InjectedFault, KeyboardInterrupt):
            case = tmp_path / f"{fault_at}-{exc.__name__}"
            case.mkdir()
            path = _prepare(run, case, state)

            def fail(index, name, args, call, _at=fault_at, _exc=exc):
                if index == _at:
                    raise _exc(f"injected at call {index} ({name})")
                return call()

            with monkeypatch.context() as m:
                _instrument(m.setattr, fail)
                with pytest.raises(exc, match="injected"):
                    run["handle"].save_delta(path)
            expected = _expected(run, state, fault_at, commit)
            _check_loads_as(path, expected)
            cleanup_failed = call_name in ("unlink", "rmdir")
            if state == "new path" and expected is None and not cleanup_failed:
                assert not path.exists()  # the directory the save created is gone again
            elif not cleanup_failed:
                assert listing(path) in (DELTA_FILES, []), (fault_at, call_name, listing(path))
            else:  # leftovers the next save clears
                assert all(n in (*DELTA_FILES, "delta.safetensors.pending") or n.startswith(".seat-tmp-")
                           for n in listing(path)), (fault_at, call_name, listing(path))
            _check_next_save_cleans_up(run, path)


def _save_then_die(handle, path: Path, kill_at: int, partial: bool) -> None:
    """In a forked child: save, SIGKILLed before call `kill_at` of the write sequence, or
    (partial) in the middle of that call's file write."""
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            die()

    def maybe_die(index, name, args, call):
        if index != kill_at:
            return call()
        if not partial:
            die()
        if name == "save_file":
            call()
            target = Path(args[1])
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            die()
        return HalfWriter(call())  # open for writing: half the bytes reach the file

    _instrument(lambda module, name, value: setattr(module, name, value), maybe_die)
    handle.save_delta(path)
    os._exit(3)  # not killed: the sequence is shorter than the test thinks


@pytest.mark.parametrize("state", OLD_STATES)
def test_a_kill_at_any_step_leaves_the_old_or_the_new_delta(run, tmp_path, monkeypatch, state):
    calls, commit = _sequence(run, tmp_path, state, monkeypatch)
    names = [name for name, _ in calls]
    cases = [(k, False) for k in range(len(calls))]  # killed before each call
    cases += [(k, True) for k, (name, args) in enumerate(calls)  # killed halfway through each file write
              if name == "save_file" or (name == "open" and args[1:2] == ["wb"])]
    assert sum(partial for _, partial in cases) == 2  # the weights and the config
    fork = multiprocessing.get_context("fork")
    for kill_at, partial in cases:
        case = tmp_path / f"{kill_at}-{partial}"
        case.mkdir()
        path = _prepare(run, case, state)
        child = fork.Process(target=_save_then_die, args=(run["handle"], path, kill_at, partial))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL, (kill_at, names[kill_at], child.exitcode)
        _check_loads_as(path, _expected(run, state, kill_at, commit))
        _check_next_save_cleans_up(run, path)
