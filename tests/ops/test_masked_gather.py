"""masked_gather_ on every backend against the float64 oracle: odd sizes, each dtype,
empty / full / single-entry masks, accumulation."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device, random_indices, tol

from seat import ops

SIZES = [(1,), (17,), (4097,), (33, 65)]


def oracle(out: torch.Tensor, dense: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return out.double() + dense.double().reshape(-1)[idx.long()]


@pytest.mark.parametrize("shape", SIZES, ids=str)
@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0], ids=["empty", "sparse", "full"])
def test_matches_oracle(backend, shape, dense_dtype, density):
    device = backend_device("masked_gather_", backend)
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(shape, generator=gen).to(dense_dtype)
    numel = dense.numel()
    idx = random_indices(numel, int(round(density * numel)), gen)
    out_dtype = torch.float64 if dense_dtype == torch.float64 else torch.float32
    out = torch.randn(idx.numel(), generator=gen, dtype=out_dtype)
    expected = oracle(out, dense, idx)
    dense, idx, out = dense.to(device), idx.to(device), out.to(device)
    with ops.use_backend(backend):
        result = ops.masked_gather_(out, dense, idx)
    assert result is out
    torch.testing.assert_close(out.cpu().double(), expected, **tol(out_dtype))


def test_single_entry_and_accumulation(backend):
    """nnz = 1, and three micro-batches accumulate into one compact buffer."""
    device = backend_device("masked_gather_", backend)
    idx = torch.tensor([12], dtype=torch.int32, device=device)
    out = torch.zeros(1, device=device)
    with ops.use_backend(backend):
        for scale in (1.0, 2.0, 3.0):
            dense = torch.arange(20, dtype=torch.float32, device=device).reshape(4, 5) * scale
            ops.masked_gather_(out, dense, idx)
    assert out.item() == 12.0 * 6.0


def test_out_of_mask_entries_untouched(backend):
    """Only out changes; the dense tensor is read-only."""
    device = backend_device("masked_gather_", backend)
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(257, generator=gen).to(device)
    before = dense.clone()
    idx = random_indices(257, 40, gen, device)
    with ops.use_backend(backend):
        ops.masked_gather_(torch.zeros(40, device=device), dense, idx)
    assert torch.equal(dense, before)


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_bf16_out_is_the_bf16_rounding(backend, dense_dtype):
    """A bf16 compact gradient: one gather into zeros is exactly the round-to-nearest-even
    bf16 rounding of the gathered values (the lean mode's documented tolerance); a second
    gather sums in fp32 and rounds once more."""
    device = backend_device("masked_gather_", backend)
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(33, 65, generator=gen, dtype=torch.float64).to(dense_dtype)
    idx = random_indices(dense.numel(), 700, gen)
    values = dense.reshape(-1)[idx.long()]
    first = values.float().to(torch.bfloat16)
    second = (first.float() + values.float()).to(torch.bfloat16)
    dense, idx = dense.to(device), idx.to(device)
    out = torch.zeros(idx.numel(), dtype=torch.bfloat16, device=device)
    with ops.use_backend(backend):
        ops.masked_gather_(out, dense, idx)
        assert torch.equal(out.cpu(), first)
        ops.masked_gather_(out, dense, idx)
    assert torch.equal(out.cpu(), second)
