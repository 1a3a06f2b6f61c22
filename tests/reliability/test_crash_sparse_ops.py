"""Crash tests of the sparse-update ops: calls that used to read or write outside their
tensors run in a subprocess, where a segfault is a failed test (a signal), not a lost
test run. Each must end with a clear Python error or a correct result.

Two groups, each on the cpu and triton (interpreted) backends:

  ops      the public ops with a mask edited through .numpy() after a first use (torch's
           version counter does not see the write): refused with a ValueError naming the
           mask, every input unchanged.
  kernels  the kernels called directly (torch.ops.seat_C.*, seat_kernels.sparse_update),
           past every Python check: they skip what lies outside the tensors. Each tensor
           sits inside a larger buffer whose margins hold a sentinel, so a write outside
           it shows even where it would not crash.

A group runs in one subprocess (its cases one after another, one JSON line each); the
tests read their case's line, and a group that died by a signal fails all of its cases.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the shared helpers, in the subprocess too
import _hostile as H  # noqa: E402

from seat import ops  # noqa: E402
from seat.ops import _encodings  # noqa: E402

CASES: dict[str, dict[str, callable]] = {"ops": {}, "kernels": {}}


def case(group: str):
    def register(fn):
        CASES[group][fn.__name__] = fn
        return fn
    return register


def _idx(*v):
    return torch.tensor(v, dtype=torch.int32)


def _refused_unchanged(call, tensors, match: str) -> str:
    """call() must raise a ValueError containing `match` and leave tensors as they were."""
    before = [H.bits(t) for t in tensors]
    try:
        call()
    except ValueError as exc:
        assert match in str(exc), f"unclear error: {exc}"
        assert all(torch.equal(H.bits(t), b) for t, b in zip(tensors, before)), "inputs changed before the error"
        return f"ValueError: {exc}"
    raise AssertionError("a lying mask was accepted")


# ----------------------------------------------------------------------------- ops: lying masks


@case("ops")
def gather_index_set_to_int32_max():
    """The reported reproducer: idx.numpy()[2] = 2**31 - 1 before a second masked_gather_."""
    dense, idx, out = torch.randn(1000), _idx(1, 5, 9, 20), torch.zeros(4)
    ops.masked_gather_(out, dense, idx)
    idx.numpy()[2] = 2**31 - 1
    return _refused_unchanged(lambda: ops.masked_gather_(out, dense, idx), [out, dense, idx], "mask")


@case("ops")
def swap_index_past_param():
    param, idx, values = torch.randn(100), _idx(3, 50, 99), torch.randn(3)
    ops.masked_swap_(param, idx, values)
    idx.numpy()[-1] = 100 + 10_000_000
    return _refused_unchanged(lambda: ops.masked_swap_(param, idx, values), [param, values], "mask")


def _adamw_args(numel, mask, nnz, *, dense_state=False):
    n = numel if dense_state else nnz
    return ([torch.randn(numel)], [mask], [torch.randn(nnz)], [torch.zeros(n)], [torch.zeros(n)],
            [torch.randn(n)], [torch.zeros(n)])


def _adamw_lie(numel, mask, nnz, edit, **kw):
    args = _adamw_args(numel, mask, nnz, **kw)
    ops.sparse_adamw_(*args, lr=0.1, step=1, **kw)
    edit()
    tensors = [t for group in args for t in group if isinstance(t, torch.Tensor)]
    return _refused_unchanged(lambda: ops.sparse_adamw_(*args, lr=0.1, step=2, **kw), tensors, "mask")


@case("ops")
def adamw_index_negative_with_master_and_amsgrad():
    idx = _idx(0, 10, 20)
    return _adamw_lie(64, idx, 3, lambda: idx.numpy().__setitem__(0, -(2**31)))


@case("ops")
def adamw_dense_state_index_past_param():
    idx = _idx(0, 10, 20)
    return _adamw_lie(64, idx, 3, lambda: idx.numpy().__setitem__(2, 64), dense_state=True)


@case("ops")
def adamw_block16_offset_past_param():
    mask = H.build_mask("block16", 70_000, 0.01, 1)
    nnz = H.nnz_of(mask)
    return _adamw_lie(70_000, mask, nnz, lambda: mask.offsets.numpy().__setitem__(-1, 65535))


@case("ops")
def gather_block16_starts_past_offsets():
    mask = H.build_mask("block16", 70_000, 0.01, 2)
    out, dense = torch.zeros(H.nnz_of(mask)), torch.randn(70_000)
    ops.masked_gather_(out, dense, mask)
    mask.index.numpy()[1] = 2**31 - 1
    return _refused_unchanged(lambda: ops.masked_gather_(out, dense, mask), [out, dense], "block_starts")


@case("ops")
def swap_block16_fresh_lying_mask():
    """A lying mask never seen before (what a freed block_starts whose address is reused
    looks like to a cache keyed by id)."""
    starts, offsets = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([1, 2, 65535], dtype=torch.uint16)
    mask = _encodings.MaskArgs(_encodings.BLOCK16, starts, offsets, _encodings.NO_INTS)
    param, values = torch.randn(300), torch.randn(3)
    return _refused_unchanged(lambda: ops.masked_swap_(param, mask, values), [param, values], "offsets reach")


@case("ops")
def adamw_hash_offsets_past_nnz():
    mask = H.build_mask("hash", 1000, 0.3, 3)
    nnz = H.nnz_of(mask)
    return _adamw_lie(1000, mask, nnz, lambda: mask.index.numpy().__setitem__(2, 2**31 - 1))


# ----------------------------------------------------------------------------- kernels: no checks at all


def _kernel(name: str, backend: str):
    """The unchecked kernel of op `name` on `backend` (the op layer's own launcher)."""
    import importlib

    from seat.ops import _native

    if backend == "cpu":
        _native.load()  # registers torch.ops.seat_C (backend selection does it for the ops)
    module = importlib.import_module(f"seat.ops.{name}")
    return module.ENTRY.kernels[backend]


def _lying_masks(numel: int):
    """(name, mask, positions) of masks of 5 entries whose entries reach outside a tensor
    of numel (< 65536) elements; positions: what each slot reads once the kernels skip
    what lies outside (None: skipped)."""
    yield "index", _encodings.as_mask_args("mask", _idx(1, -7, 2**31 - 1, numel, 3)), (1, None, None, None, 3)
    yield ("block16 offsets", _encodings.MaskArgs(_encodings.BLOCK16, _idx(0, 5),
                                                  torch.tensor([1, 65535, numel, 2, 9], dtype=torch.uint16),
                                                  _encodings.NO_INTS), (1, None, None, 2, 9))
    yield ("block16 starts", _encodings.MaskArgs(_encodings.BLOCK16, _idx(-(2**31), 2**31 - 1),
                                                 torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint16),
                                                 _encodings.NO_INTS), (1, 2, 3, 4, 5))
    yield ("hash offsets", _encodings.MaskArgs(_encodings.HASH, _idx(-(2**31), 2**31 - 1),
                                               _encodings.no_offsets(torch.device("cpu")), (12345, 2**31, 256)),
           (None,) * 5)


def _kernel_case(op: str):
    numel, nnz, pad = 200, 5, 64
    results = []
    for name, mask, _ in _lying_masks(numel):
        backend = CURRENT_BACKEND[0]
        for dense_state in (False, True) if op == "sparse_adamw" else (False,):
            pbuf, param = H.guarded(numel, torch.float32, pad)
            cbuf, compact = H.guarded(nnz, torch.float32, pad)
            if op == "masked_gather":
                _kernel(op, backend)(compact, param, mask)
            elif op == "masked_swap":
                _kernel(op, backend)(param, compact, mask)
            else:
                n = numel if dense_state else nnz
                states = [H.guarded(n, torch.float32, pad) for _ in range(4)]
                exp_avg, exp_avg_sq, master, max_exp_avg_sq = (s[1] for s in states)
                _kernel("sparse_adamw", backend)(
                    [param], [mask], [compact], [exp_avg], [exp_avg_sq], [master], [max_exp_avg_sq], lr=0.1,
                    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, maximize=False,
                    stochastic_rounding=False, seed=0, dense_state=dense_state)
                assert all(H.guards_intact(b, n, pad) for b, _ in states), f"{name}: a state was written outside"
            assert H.guards_intact(pbuf, numel, pad), f"{name}: the param was written outside"
            assert H.guards_intact(cbuf, nnz, pad), f"{name}: the compact array was written outside"
        results.append(name)
    return f"in bounds: {', '.join(results)}"


CURRENT_BACKEND = ["cpu"]


@case("kernels")
def gather_kernel_skips_what_lies_outside():
    return _kernel_case("masked_gather")


@case("kernels")
def swap_kernel_skips_what_lies_outside():
    return _kernel_case("masked_swap")


@case("kernels")
def adamw_kernel_skips_what_lies_outside():
    return _kernel_case("sparse_adamw")


@case("kernels")
def gather_kernel_skips_exactly_what_lies_outside():
    """Entries outside the tensor are skipped (not clamped onto another element); the
    others are gathered as usual."""
    dense = torch.randn(200)
    for name, mask, positions in _lying_masks(dense.numel()):
        out = torch.zeros(len(positions))
        _kernel("masked_gather", CURRENT_BACKEND[0])(out, dense, mask)
        expected = torch.tensor([0.0 if p is None else float(dense[p]) for p in positions])
        assert torch.equal(out, expected), f"{name}: {out} != {expected}"
    return "skipped exactly the entries outside"


def run_cases(group: str, backend: str) -> None:
    """Subprocess entry: run every case of `group` on `backend`, one JSON line each."""
    CURRENT_BACKEND[0] = backend
    for name, fn in CASES[group].items():
        try:
            with ops.use_backend(backend):
                detail = fn()
            line = {"case": name, "ok": True, "detail": detail}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent test
            line = {"case": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(line), flush=True)


# ----------------------------------------------------------------------------- the tests

CRASH_BACKENDS = ("cpu", "triton")


@functools.cache
def _group_run(group: str, backend: str):
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_crash_sparse_ops as t; "
            f"t.run_cases({group!r}, {backend!r})")
    proc = H.run_python(code)
    lines = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            lines[row["case"]] = row
    return proc, lines


@pytest.mark.parametrize("backend", CRASH_BACKENDS)
@pytest.mark.parametrize("group,name", [(g, n) for g, cases in CASES.items() for n in cases])
def test_no_crash(group, name, backend):
    proc, lines = _group_run(group, backend)
    assert proc.returncode >= 0, f"the {group} subprocess died by signal {-proc.returncode}:\n{proc.stderr[-3000:]}"
    assert name in lines, f"{name} did not report (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert lines[name]["ok"], lines[name]["detail"]
    assert proc.returncode == 0, proc.stderr[-3000:]
