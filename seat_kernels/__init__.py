"""Triton kernels of seat, one module per kernel family, each with its launch wrappers.

Kernel modules import triton; this package file does not, so `import seat_kernels`
stays cheap. Every kernel declares the signatures it is compiled for ahead of time
(`AOT_SPECS` in its module); `aot_specs()` collects them for the AOT compile check
(`python -m seat_kernels.aot`).
"""
from __future__ import annotations

import importlib

# Modules holding Triton kernels; a new kernel family adds its module here.
KERNEL_MODULES = ("seat_kernels.sparse_update", "seat_kernels.kl_div", "seat_kernels.dequant4")


def aot_specs():
    """Every AotSpec declared by the kernel modules (imports triton)."""
    specs = []
    for name in KERNEL_MODULES:
        specs.extend(importlib.import_module(name).AOT_SPECS)
    return specs
