"""masked_gather_(out, dense, idx): out += dense.view(-1)[idx].

Compacts a dense gradient into the compact fp32 buffer of a sparse mask, so the dense
gradient can be freed as soon as it exists (called from a post-accumulate-grad hook).

Shapes and dtypes:
  out   (nnz,)  float32 (float64 in the oracle tests) or bfloat16 (the lean compact
                gradient), contiguous; accumulated in place. A bf16 out sums in fp32 and
                rounds once to nearest-even bf16: one gather into a zeroed buffer gives
                exactly the bf16 rounding of the gradient, but every further micro-batch
                accumulated into it rounds again (error growing with the number of
                micro-batches; seat.optim.SparseAdamW accumulates in fp32 instead).
  dense (any)   float16 / bfloat16 / float32 / float64, contiguous; read as dense.view(-1).
  idx   (nnz,)  int32, sorted, unique, in [0, dense.numel()).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _registry


def reference(out: Tensor, dense: Tensor, idx: Tensor) -> None:
    values = dense.reshape(-1)[idx.long()]
    if out.dtype == torch.bfloat16:  # sum in fp32, round once (as the kernels do)
        out.copy_(out.float() + values.float())
    else:
        out += values.to(out.dtype)


def _native(out: Tensor, dense: Tensor, idx: Tensor) -> None:
    torch.ops.seat_C.masked_gather_(out, dense, idx)


def _triton(out: Tensor, dense: Tensor, idx: Tensor) -> None:
    from seat_kernels.masked_ops import masked_gather_

    masked_gather_(out, dense, idx)


ENTRY = _registry.register("masked_gather_", reference, {"cpu": _native, "cuda": _native, "triton": _triton})


def check(out, dense, idx, *, values: bool = True) -> None:
    _checks.tensor("out", out, dtypes=(*_checks.ACCUM_DTYPES, torch.bfloat16), ndim=1)
    _checks.tensor("dense", dense, dtypes=_checks.FLOAT_DTYPES)
    _checks.index_tensor("idx", idx, dense.numel())
    _checks.same_numel("out", out, "idx", idx)
    _checks.same_device(dense=dense, out=out, idx=idx)
    if values:
        _checks.index_values("idx", idx, dense.numel())


@torch.library.custom_op("seat::masked_gather_", mutates_args=("out",))
def _masked_gather_op(out: Tensor, dense: Tensor, idx: Tensor) -> None:
    check(out, dense, idx)
    ENTRY.run(dense.device, out, dense, idx)


@_masked_gather_op.register_fake
def _(out, dense, idx):
    check(out, dense, idx, values=False)


def masked_gather_(out: Tensor, dense: Tensor, idx: Tensor) -> Tensor:
    """out += dense.view(-1)[idx] in place; returns out. See the module docstring."""
    check(out, dense, idx, values=False)  # type errors before the dispatcher sees the call
    torch.ops.seat.masked_gather_(out, dense, idx)
    return out
