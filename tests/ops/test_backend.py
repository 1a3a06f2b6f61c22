"""Backend selection: defaults by device, SEAT_BACKEND / use_backend overrides, and the
errors for an unknown backend, a missing kernel, and a missing or stale seat._C."""
from __future__ import annotations

import types

import pytest
import torch

from seat import ops
from seat.ops import _backend, _native

CPU = torch.device("cpu")


def test_default_on_cpu_is_the_native_kernel_when_one_exists(monkeypatch):
    monkeypatch.delenv("SEAT_BACKEND", raising=False)
    assert _backend.select("masked_gather_", ops.OPS["masked_gather_"].kernels, CPU)[0] == "cpu"
    assert _backend.select("kl_div", ops.OPS["kl_div"].kernels, CPU)[0] == "cpu"
    # an op without a kernel for the device falls through to its reference
    assert _backend.select("no_kernels_op", {}, CPU)[0] == "reference"


def test_env_var_and_context_manager(monkeypatch):
    entry = ops.OPS["masked_swap_"]
    monkeypatch.setenv("SEAT_BACKEND", "reference")
    assert _backend.select("masked_swap_", entry.kernels, CPU)[0] == "reference"
    with ops.use_backend("cpu"):  # the scoped override wins over the environment
        assert _backend.select("masked_swap_", entry.kernels, CPU)[0] == "cpu"
    assert _backend.select("masked_swap_", entry.kernels, CPU)[0] == "reference"


def test_unknown_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("SEAT_BACKEND", "rocm")
    with pytest.raises(ValueError, match="SEAT_BACKEND='rocm' is not a seat backend"):
        ops.masked_gather_(torch.zeros(1), torch.ones(3), torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="backend='x' is not a seat backend"):
        with ops.use_backend("x"):
            pass


def test_forced_backend_without_kernel_is_an_error():
    # every registered op has kernels now: a table without one stands in for a new op
    with ops.use_backend("cpu"), pytest.raises(NotImplementedError, match="seat.ops.no_kernels_op has no cpu kernel"):
        _backend.select("no_kernels_op", {"triton": print}, CPU)


def test_forced_backend_on_the_wrong_device_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.use_backend("cuda"), pytest.raises(ValueError, match="cuda backend runs on CUDA tensors"):
        ops.masked_swap_(torch.zeros(3), torch.tensor([1], dtype=torch.int32), torch.ones(1))
    with ops.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.masked_swap_(torch.zeros(3), torch.tensor([1], dtype=torch.int32), torch.ones(1))


def test_missing_build_raises_on_first_use_with_rebuild_hint(monkeypatch):
    error = _native.NativeBuildError("seat._C, the native extension, could not be loaded (x). " + _native.REBUILD_HINT)
    monkeypatch.setattr(_native, "_load_cached", lambda: (None, error))
    monkeypatch.delenv("SEAT_BACKEND", raising=False)
    with pytest.raises(_native.NativeBuildError, match="pip install --no-build-isolation -e ."):
        ops.masked_gather_(torch.zeros(1), torch.ones(3), torch.tensor([1], dtype=torch.int32))
    # the reference still works without a build
    with ops.use_backend("reference"):
        assert ops.masked_gather_(torch.zeros(1), torch.ones(3), torch.tensor([1], dtype=torch.int32)).item() == 1.0


def _fake_module(**overrides):
    import seat
    from seat._srchash import native_source_hash

    root = _native.source_tree()
    fields = dict(__version__=seat.__version__, torch_version=torch.__version__,
                  source_hash=native_source_hash(root) if root else "", with_cuda=0, cuda_archs="", openmp=0)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def test_stale_build_reasons():
    assert _native.stale_reasons(_fake_module()) == []
    assert "built for seat 0.0.1" in _native.stale_reasons(_fake_module(__version__="0.0.1"))[0]
    assert "built against torch 1.0" in _native.stale_reasons(_fake_module(torch_version="1.0"))[0]
    if _native.source_tree() is not None:
        assert "csrc/ changed" in _native.stale_reasons(_fake_module(source_hash="0" * 16))[0]


def test_the_installed_build_is_current():
    """The build under test matches its sources (make test rebuilds before testing)."""
    module = _native.load()
    assert _native.stale_reasons(module) == []
    assert module.openmp > 0, "seat._C was compiled without OpenMP"
