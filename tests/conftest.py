"""Shared fixtures: backends, devices, tolerances, and the Triton interpreter switch.

Without a GPU, TRITON_INTERPRET=1 is set here, before any kernel module is imported
(Triton decides interpreted vs compiled when a kernel is decorated), so the "triton"
backend runs every Triton kernel on CPU tensors through the interpreter. With a GPU the
Triton kernels run compiled on it. The AOT compile test unsets it in its subprocess.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

from seat import ops  # noqa: E402
from seat.ops import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ("reference", "cpu", "triton", "cuda")

# (rtol, atol) per dtype of the tensor being compared, against a float64 oracle.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


# Fuzzing profiles (hypothesis): "ci" keeps each property test to a few seconds; "long"
# is for local hunting: SEAT_HYPOTHESIS_PROFILE=long make test.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("SEAT_HYPOTHESIS_PROFILE", "ci"))


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run `make gpu-test` on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
            item.add_marker(skip_cuda)


def backend_device(op_name: str, backend: str) -> torch.device:
    """The device to test `backend` of op `op_name` on, or skip with the reason."""
    entry = ops.OPS[op_name]
    if backend != "reference" and backend not in entry.kernels:
        pytest.skip(f"seat.ops.{op_name} has no {backend} kernel yet")
    if backend == "cuda":
        if not HAS_CUDA:
            pytest.skip("cuda backend: no CUDA GPU")
        return torch.device("cuda")
    if backend == "triton":
        if HAS_CUDA:
            return torch.device("cuda")
        if not _backend.triton_interpreting():
            pytest.skip("triton backend without a GPU needs TRITON_INTERPRET=1")
        if _backend.unusable_reason("triton", torch.device("cpu")):
            pytest.skip(_backend.unusable_reason("triton", torch.device("cpu")))
        return torch.device("cpu")
    return torch.device("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend name in turn; pair with backend_device() and ops.use_backend()."""
    return request.param


@pytest.fixture
def interpreter():
    """Skip unless Triton kernels run through the interpreter in this process."""
    if not _backend.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is not set (a GPU is present: Triton runs compiled)")
    if _backend.unusable_reason("triton", torch.device("cpu")):
        pytest.skip(_backend.unusable_reason("triton", torch.device("cpu")))


def random_indices(numel: int, nnz: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """nnz sorted unique int32 indices into a tensor of numel elements."""
    perm = torch.randperm(numel, generator=generator)[:nnz]
    return perm.sort().values.to(torch.int32).to(device)
