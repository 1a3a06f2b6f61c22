"""Stochastic rounding of bf16 params in sparse_adamw_: unbiased, seeded, and identical
bits on every backend (the random bits are a hash of seed, step, tensor and position)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_device

from seat import ops
from seat.ops import _adamw

N = 20_000
LR = 1e-3


def _one_step(device, *, stochastic: bool, seed: int = 7, step: int = 1):
    param = torch.ones(N + 3, dtype=torch.bfloat16, device=device)
    idx = torch.arange(1, N + 1, dtype=torch.int32, device=device)
    grad = torch.ones(N, device=device)  # Adam's first step moves every entry by -lr
    zeros = [torch.zeros(N, device=device) for _ in range(2)]
    ops.sparse_adamw_([param], [idx], [grad], [zeros[0]], [zeros[1]], lr=LR, step=step,
                      stochastic_rounding=stochastic, seed=seed)
    return param


def test_update_below_bf16_resolution_is_lost_without_it(backend):
    device = backend_device("sparse_adamw_", backend)
    with ops.use_backend(backend):
        param = _one_step(device, stochastic=False)
    assert torch.all(param == 1.0)  # 1 - 1e-3 rounds back to 1.0 in bf16


def test_unbiased(backend):
    device = backend_device("sparse_adamw_", backend)
    with ops.use_backend(backend):
        param = _one_step(device, stochastic=True)
    values = param[1:N + 1].double()
    exact = 1.0 - LR  # the fp32 result of the step, up to ~1e-7
    lower, upper = 1.0 - 2**-8, 1.0  # the bf16 neighbours
    assert set(values.unique().tolist()) <= {lower, upper}
    p_up = (exact - lower) / (upper - lower)
    sigma = (upper - lower) * math.sqrt(p_up * (1 - p_up) / N)
    assert abs(values.mean().item() - exact) < 5 * sigma
    assert param[0] == 1.0 and param[-1] == 1.0 and param[-2] == 1.0  # outside the mask


def test_seeded_and_identical_across_backends(backend):
    device = backend_device("sparse_adamw_", backend)
    with ops.use_backend(backend):
        a = _one_step(device, stochastic=True, seed=7).cpu()
        b = _one_step(device, stochastic=True, seed=7).cpu()
        c = _one_step(device, stochastic=True, seed=8).cpu()
        d = _one_step(device, stochastic=True, seed=7, step=2).cpu()
    with ops.use_backend("reference"):
        expected = _one_step("cpu", stochastic=True, seed=7)
    assert torch.equal(a, b) and torch.equal(a, expected)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_random_bits_are_uniform():
    bits = _adamw.random_bits(_adamw.step_key(3, 1), 0, torch.arange(100_000))
    low = (bits & 0xFFFF).double() / 65536
    assert abs(low.mean().item() - 0.5) < 0.005
    assert bits.unique().numel() > 99_990


def test_float16_without_master_is_refused():
    param = torch.ones(4, dtype=torch.float16)
    idx = torch.tensor([0, 2], dtype=torch.int32)
    state = [torch.zeros(2) for _ in range(3)]
    with pytest.raises(ValueError, match="stochastic_rounding supports bfloat16"):
        ops.sparse_adamw_([param], [idx], [state[0]], [state[1]], [state[2]], lr=0.1, step=1,
                          stochastic_rounding=True)
