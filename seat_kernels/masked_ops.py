"""Triton kernels of masked_gather_ and masked_swap_ (the compact <-> dense moves of a
sparse mask): one program per BLOCK compact entries.

Launch wrappers take tensors already validated by seat.ops (contiguous, int32 sorted
in-range idx, matching sizes and devices).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._spec import AotSpec
from .adamw_math import round_to_param

BLOCK = 1024

# masked_swap_ moves bits: tensors are viewed as unsigned-width integers of their size.
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def masked_gather_kernel(out_ptr, dense_ptr, idx_ptr, nnz, BLOCK: tl.constexpr):
    """out[i] += dense[idx[i]] for i < nnz, accumulated in out's dtype; a bf16 out (the
    lean compact gradient) sums in fp32 and rounds once to nearest-even bf16, by hand
    (round_to_param) so the interpreter and the GPU give the same bits."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < nnz
    idx = tl.load(idx_ptr + offs, mask=in_range, other=0)
    value = tl.load(dense_ptr + idx, mask=in_range, other=0.0)
    acc = tl.load(out_ptr + offs, mask=in_range, other=0.0)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        total = acc.to(tl.float32) + value.to(tl.float32)
        tl.store(out_ptr + offs, round_to_param(total, idx, 0, tl.bfloat16, False), mask=in_range)
    else:
        tl.store(out_ptr + offs, acc + value.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def masked_swap_kernel(param_ptr, values_ptr, idx_ptr, nnz, BLOCK: tl.constexpr):
    """param[idx[i]] <-> values[i] for i < nnz (integer views: bits, not numbers)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < nnz
    idx = tl.load(idx_ptr + offs, mask=in_range, other=0)
    held = tl.load(param_ptr + idx, mask=in_range)
    incoming = tl.load(values_ptr + offs, mask=in_range)
    tl.store(param_ptr + idx, incoming, mask=in_range)
    tl.store(values_ptr + offs, held, mask=in_range)


def _grid(nnz: int):
    return (triton.cdiv(nnz, BLOCK),)


def masked_gather_(out: torch.Tensor, dense: torch.Tensor, idx: torch.Tensor) -> None:
    nnz = idx.numel()
    if nnz:
        masked_gather_kernel[_grid(nnz)](out, dense, idx, nnz, BLOCK=BLOCK)


def masked_swap_(param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    nnz = idx.numel()
    if nnz:
        bits = _BITS_DTYPE[param.element_size()]
        masked_swap_kernel[_grid(nnz)](param.view(bits), values.view(bits), idx, nnz, BLOCK=BLOCK)


AOT_SPECS = [
    *(
        AotSpec(f"masked_gather_kernel[{src}->fp32]", masked_gather_kernel,
                {"out_ptr": "*fp32", "dense_ptr": f"*{src}", "idx_ptr": "*i32", "nnz": "i32", "BLOCK": "constexpr"},
                {"BLOCK": BLOCK})
        for src in ("fp32", "fp16", "bf16")
    ),
    AotSpec("masked_gather_kernel[bf16->bf16]", masked_gather_kernel,
            {"out_ptr": "*bf16", "dense_ptr": "*bf16", "idx_ptr": "*i32", "nnz": "i32", "BLOCK": "constexpr"},
            {"BLOCK": BLOCK}),
    AotSpec("masked_gather_kernel[fp32->bf16]", masked_gather_kernel,
            {"out_ptr": "*bf16", "dense_ptr": "*fp32", "idx_ptr": "*i32", "nnz": "i32", "BLOCK": "constexpr"},
            {"BLOCK": BLOCK}),
    *(
        AotSpec(f"masked_swap_kernel[{bits}]", masked_swap_kernel,
                {"param_ptr": f"*{bits}", "values_ptr": f"*{bits}", "idx_ptr": "*i32", "nnz": "i32",
                 "BLOCK": "constexpr"},
                {"BLOCK": BLOCK})
        for bits in ("i16", "i32")
    ),
]
