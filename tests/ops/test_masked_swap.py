"""masked_swap_ on every backend: bit-exact exchange, involution, every dtype width,
NaN payloads preserved, empty / full / single-entry masks."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device, random_indices

from seat import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32]


def _random(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("shape", [(1,), (17,), (4097,), (9, 31)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0], ids=["empty", "sparse", "full"])
def test_swap_is_exact_and_involutive(backend, shape, dtype, density):
    device = backend_device("masked_swap_", backend)
    gen = torch.Generator().manual_seed(0)
    param = _random(shape, dtype, gen)
    idx = random_indices(param.numel(), int(round(density * param.numel())), gen)
    values = _random((idx.numel(),), dtype, gen)
    expected_param = param.clone()
    expected_param.view(-1)[idx.long()] = values
    expected_values = param.view(-1)[idx.long()].clone()
    original_param, original_values = param.clone(), values.clone()
    param, idx, values = param.to(device), idx.to(device), values.to(device)
    with ops.use_backend(backend):
        ops.masked_swap_(param, idx, values)
        assert torch.equal(param.cpu(), expected_param)
        assert torch.equal(values.cpu(), expected_values)
        ops.masked_swap_(param, idx, values)  # swapping back restores both, bit for bit
    assert torch.equal(param.cpu(), original_param)
    assert torch.equal(values.cpu(), original_values)


def test_nan_payload_and_signed_zero_survive(backend):
    device = backend_device("masked_swap_", backend)
    bits = torch.tensor([0x7FC00001, 0x7F800001, -0x80000000, 0x3F800000], dtype=torch.int32)
    values = bits.view(torch.float32).clone().to(device)
    param = torch.zeros(10, device=device)
    idx = torch.tensor([0, 3, 5, 9], dtype=torch.int32, device=device)
    with ops.use_backend(backend):
        ops.masked_swap_(param, idx, values)
    assert torch.equal(param.cpu().view(torch.int32)[[0, 3, 5, 9]], bits)


def test_single_entry(backend):
    device = backend_device("masked_swap_", backend)
    param = torch.arange(6, dtype=torch.bfloat16, device=device).reshape(2, 3)
    values = torch.tensor([-7.0], dtype=torch.bfloat16, device=device)
    with ops.use_backend(backend):
        ops.masked_swap_(param, torch.tensor([4], dtype=torch.int32, device=device), values)
    assert param[1, 1].item() == -7.0 and values.item() == 4.0
