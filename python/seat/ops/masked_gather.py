"""masked_gather_(out, dense, mask): out += dense.view(-1)[mask's entries].

Compacts a dense gradient into the compact buffer of a sparse mask, so the dense
gradient can be freed as soon as it exists (called from a post-accumulate-grad hook).

Shapes and dtypes:
  out   (nnz,)  float32 (float64 in the oracle tests) or bfloat16 (the lean compact
                gradient), contiguous; accumulated in place. A bf16 out sums in fp32 and
                rounds once to nearest-even bf16: one gather into a zeroed buffer gives
                exactly the bf16 rounding of the gradient, but every further micro-batch
                accumulated into it rounds again (error growing with the number of
                micro-batches; seat.optim.SparseAdamW accumulates in fp32 instead).
  dense (any)   float16 / bfloat16 / float32 / float64, contiguous; read as dense.view(-1).
  mask          int32 sorted unique indices into dense.view(-1), or a seat.masks mask in
                any encoding (IndexMask, Block16Mask, ImplicitMask): see _encodings.py.
                Slot j of out is the mask's j-th entry in increasing position order.
  out may not share memory with dense or the mask (ValueError naming both).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _checks, _encodings, _registry
from ._encodings import MaskArgs


def reference(out: Tensor, dense: Tensor, mask: MaskArgs) -> None:
    pos, slot = _encodings.entries(mask, dense.numel(), out.numel())
    values = dense.reshape(-1)[pos]
    if out.dtype == torch.bfloat16:  # sum in fp32, round once (as the kernels do)
        out[slot] = (out[slot].float() + values.float()).to(torch.bfloat16)
    else:
        out[slot] += values.to(out.dtype)


def _native(out: Tensor, dense: Tensor, mask: MaskArgs) -> None:
    torch.ops.seat_C.masked_gather_(out, dense, mask.encoding, mask.index, mask.offsets, list(mask.ints))


def _triton(out: Tensor, dense: Tensor, mask: MaskArgs) -> None:
    from seat_kernels.sparse_update import masked_gather_

    masked_gather_(out, dense, mask.encoding, mask.index, mask.offsets, list(mask.ints))


ENTRY = _registry.register("masked_gather_", reference, {"cpu": _native, "cuda": _native, "triton": _triton})


def check(out, dense, mask: MaskArgs, *, values: bool = True) -> None:
    _checks.tensor("out", out, dtypes=(*_checks.ACCUM_DTYPES, torch.bfloat16), ndim=1)
    _checks.tensor("dense", dense, dtypes=_checks.FLOAT_DTYPES)
    _encodings.check("mask", mask, dense.numel(), "out", out, values=values)
    _checks.same_device(dense=dense, out=out, mask=mask.index, mask_offsets=mask.offsets)
    if values:
        _checks.no_aliasing((("out", out, True), ("dense", dense, False), ("mask", mask.index, False),
                             ("mask.offsets", mask.offsets, False)))


@torch.library.custom_op("seat::masked_gather_", mutates_args=("out",))
def _masked_gather_op(out: Tensor, dense: Tensor, mask_index: Tensor, mask_offsets: Optional[Tensor] = None,
                      encoding: int = _encodings.INDEX, mask_ints: Optional[List[int]] = None) -> None:
    mask = _encodings.from_op_args(mask_index, mask_offsets, encoding, mask_ints)
    check(out, dense, mask)
    ENTRY.run(dense.device, out, dense, mask)


@_masked_gather_op.register_fake
def _(out, dense, mask_index, mask_offsets=None, encoding=_encodings.INDEX, mask_ints=None):
    check(out, dense, _encodings.from_op_args(mask_index, mask_offsets, encoding, mask_ints), values=False)


def masked_gather_(out: Tensor, dense: Tensor, mask) -> Tensor:
    """out += dense.view(-1)[mask's entries] in place; returns out. See the module docstring."""
    args = _encodings.as_mask_args("mask", mask, dense.numel() if isinstance(dense, Tensor) else None)
    check(out, dense, args, values=False)  # type errors before the dispatcher sees the call
    torch.ops.seat.masked_gather_(out, dense, args.index, args.offsets, args.encoding, list(args.ints))
    return out
