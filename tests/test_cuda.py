"""Real-GPU checks (skipped without a CUDA GPU; run with `make gpu-test`): the CUDA
build covers this GPU, and every backend agrees on large inputs on the device."""
from __future__ import annotations

import pytest
import torch
from conftest import random_indices

from seat import ops
from seat.ops import _native

pytestmark = pytest.mark.cuda


def test_native_build_has_kernels_for_this_gpu():
    module = _native.load()
    assert module.with_cuda, "seat._C was built without CUDA: rebuild with SEAT_FORCE_CUDA=1"
    major, minor = torch.cuda.get_device_capability()
    archs = module.cuda_archs.split(";")
    exact = f"{major}.{minor}" in [a.removesuffix("+PTX") for a in archs]
    jit = any(a.endswith("+PTX") and float(a.removesuffix("+PTX")) <= major + minor / 10 for a in archs)
    assert exact or jit, f"seat._C holds code for {module.cuda_archs}, not for sm_{major}{minor}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_and_swap_agree_across_backends_on_gpu(dtype):
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(4096, 1027, generator=gen).to(dtype).cuda()
    idx = random_indices(dense.numel(), dense.numel() // 20, gen, "cuda")
    results = {}
    for backend in ("reference", "triton", "cuda"):
        out = torch.ones(idx.numel(), device="cuda")
        param, values = dense.clone(), torch.zeros(idx.numel(), dtype=dtype, device="cuda")
        with ops.use_backend(backend):
            ops.masked_gather_(out, dense, idx)
            ops.masked_swap_(param, idx, values)
        results[backend] = (out, param, values)
    for backend in ("triton", "cuda"):
        for got, want in zip(results[backend], results["reference"]):
            assert torch.equal(got, want), backend
