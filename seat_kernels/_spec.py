"""AotSpec: one ahead-of-time compilation of a Triton kernel (a signature + constants)."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """A kernel and one specialization to compile without a GPU.

    signature: argument name -> Triton type ("*fp32", "i32", "constexpr", ...), in order.
    constexprs: values of the constexpr arguments."""

    name: str
    kernel: Any  # a triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    options: dict = dataclasses.field(default_factory=dict)  # more compile options (enable_fp_fusion, ...)
