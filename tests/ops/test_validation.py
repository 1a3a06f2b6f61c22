"""Bad input to the sparse-update ops raises TypeError/ValueError naming the argument,
before any kernel runs (the tensors are unchanged afterwards). The loss ops' checks are
covered in their own test files."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device

from seat import ops


def _idx(*v):
    return torch.tensor(v, dtype=torch.int32)


def gather_cases():
    dense, out, idx = torch.randn(4, 5), torch.zeros(3), _idx(0, 7, 19)
    yield "idx int64", (out, dense, idx.long()), TypeError, "mask must have dtype int32"
    yield "idx unsorted", (out, dense, _idx(7, 0, 19)), ValueError, "mask must be sorted and unique"
    yield "idx duplicate", (out, dense, _idx(0, 7, 7)), ValueError, "mask must be sorted and unique"
    yield "idx out of range", (out, dense, _idx(0, 7, 20)), ValueError, r"mask holds values in \[0, 20\]"
    yield "idx negative", (out, dense, _idx(-1, 7, 19)), ValueError, r"outside \[0, 20\)"
    yield "idx 2-D", (out, dense, idx.reshape(3, 1)), ValueError, "mask must be 1-D"
    yield "out fp16", (out.half(), dense, idx), TypeError, "out must have dtype float32, float64, bfloat16"
    yield "out wrong size", (torch.zeros(4), dense, idx), ValueError, "out must be 1-D with one entry per index"
    yield "dense int", (out, dense.long(), idx), TypeError, "dense must have dtype"
    yield "dense non-contiguous", (out, dense.t(), idx), ValueError, "dense must be contiguous"
    yield "dense not a tensor", (out, [1.0, 2.0], idx), TypeError, "dense must be a torch.Tensor"
    yield "dense on meta", (out, dense.to("meta"), idx), ValueError, "out is on cpu but dense is on meta"


def swap_cases():
    param, values, idx = torch.randn(4, 5), torch.zeros(3), _idx(0, 7, 19)
    yield "values dtype", (param, idx, values.double()), TypeError, "values must have param's dtype"
    yield "values size", (param, idx, torch.zeros(2)), ValueError, "values must be 1-D with one entry per index"
    yield "param non-contiguous", (param.t(), idx, values), ValueError, "param must be contiguous"
    yield "idx out of range", (param, _idx(0, 7, 25), values), ValueError, "mask holds values"
    yield "idx float", (param, idx.float(), values), TypeError, "mask must have dtype int32"


@pytest.mark.parametrize("case", list(gather_cases()), ids=lambda c: c[0])
def test_masked_gather_rejects(case):
    _, args, error, message = case
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else a for a in args]
    with pytest.raises(error, match=message):
        ops.masked_gather_(*args)
    assert torch.equal(args[0], before[0])  # out untouched


@pytest.mark.parametrize("case", list(swap_cases()), ids=lambda c: c[0])
def test_masked_swap_rejects(case):
    _, args, error, message = case
    before = args[0].clone()
    with pytest.raises(error, match=message):
        ops.masked_swap_(*args)
    assert torch.equal(args[0], before)


def test_checks_also_guard_the_torch_op():
    """torch.ops.seat.* (what torch.compile calls) validates data too, not only the wrapper."""
    with pytest.raises(ValueError, match="mask must be sorted"):
        torch.ops.seat.masked_gather_(torch.zeros(2), torch.randn(5), _idx(3, 1))


def test_index_check_is_redone_after_in_place_change():
    dense, out, idx = torch.randn(10), torch.zeros(2), _idx(1, 2)
    ops.masked_gather_(out, dense, idx)
    idx[1] = 10  # now out of range: the cached verdict must not hide it
    with pytest.raises(ValueError, match="mask holds values"):
        ops.masked_gather_(out, dense, idx)


def test_index_written_behind_torchs_back_is_refused():
    """A write through .numpy() does not bump the version: CPU indices are checked on
    every call, so a cached verdict cannot hide it."""
    dense, out, idx = torch.randn(10), torch.zeros(2), _idx(1, 2)
    ops.masked_gather_(out, dense, idx)
    version = idx._version
    idx.numpy()[1] = 2**31 - 1
    assert idx._version == version
    with pytest.raises(ValueError, match="mask holds values"):
        ops.masked_gather_(out, dense, idx)


def alias_cases():
    dense, idx = torch.randn(20), _idx(0, 7, 19)
    yield "gather out in dense", lambda: ops.masked_gather_(dense[4:7], dense, idx), r"dense and out share memory"
    yield "gather out is the mask", lambda: ops.masked_gather_(idx.view(torch.float32), dense, idx), \
        "share memory, and the op writes out"
    param = torch.randn(20)
    yield "swap values in param", lambda: ops.masked_swap_(param, idx, param[10:13]), "share memory"
    m = torch.zeros(3)
    yield "adamw one tensor as both moments", lambda: ops.sparse_adamw_(
        [param], [idx], [torch.randn(3)], [m], [m], lr=0.1, step=1), r"exp_avgs\[0\] and exp_avg_sqs\[0\] share"
    yield "adamw master is the grad", lambda: ops.sparse_adamw_(
        [param], [idx], [m], [torch.zeros(3)], [torch.zeros(3)], [m], lr=0.1, step=1), \
        r"grads\[0\] and masters\[0\] share memory, and the op writes masters\[0\]"
    yield "adamw a param twice", lambda: ops.sparse_adamw_(
        [param, param], [idx, idx], [m, m], [torch.zeros(3), torch.zeros(3)], [torch.zeros(3), torch.zeros(3)],
        lr=0.1, step=1), r"params\[0\] and params\[1\] share memory"


@pytest.mark.parametrize("case", list(alias_cases()), ids=lambda c: c[0])
def test_aliased_arguments_are_refused(backend, case):
    if backend_device("masked_gather_", backend).type != "cpu":
        pytest.skip("the cases are CPU tensors")
    _, call, message = case
    with ops.use_backend(backend), pytest.raises(ValueError, match=message):
        call()
