"""Without a GPU the Triton kernels really run through the interpreter in this test
session (so the `triton` backend tests in tests/ops are not silently skipped)."""
from __future__ import annotations

import importlib

import pytest
import torch

import seat_kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, Triton kernels run compiled")
def test_kernels_are_interpreted_on_cpu(interpreter):
    from triton.runtime.interpreter import InterpretedFunction

    for name in seat_kernels.KERNEL_MODULES:
        importlib.import_module(name)
    kernels = {spec.name: spec.kernel for spec in seat_kernels.aot_specs()}
    assert kernels
    for name, kernel in kernels.items():
        assert isinstance(kernel, InterpretedFunction), name


def test_every_kernel_module_declares_aot_specs():
    for name in seat_kernels.KERNEL_MODULES:
        module = importlib.import_module(name)
        assert module.AOT_SPECS, f"{name} declares no AOT_SPECS"
