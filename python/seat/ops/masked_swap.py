"""masked_swap_(param, mask, values): swap param.view(-1)[mask's entries] with values, in place.

The reference forward without a second model: swapping the stored original values into
the masked entries turns the fine-tuned model into the base model; swapping again turns
it back. Bit-exact (elements are moved, not converted), so two swaps are the identity.

Shapes and dtypes:
  param  (any)   any dtype, contiguous; its masked entries are exchanged.
  mask           int32 sorted unique indices into param.view(-1), or a seat.masks mask in
                 any encoding (see _encodings.py); slot j is its j-th entry.
  values (nnz,)  param.dtype, contiguous; may not share memory with param or the mask
                 (ValueError naming both).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _checks, _encodings, _registry
from ._encodings import MaskArgs


def reference(param: Tensor, values: Tensor, mask: MaskArgs) -> None:
    flat = param.view(-1)
    pos, slot = _encodings.entries(mask, param.numel(), values.numel())
    held = flat[pos].clone()
    flat[pos] = values[slot]
    values[slot] = held


def _native(param: Tensor, values: Tensor, mask: MaskArgs) -> None:
    torch.ops.seat_C.masked_swap_(param, values, mask.encoding, mask.index, mask.offsets, list(mask.ints))


def _triton(param: Tensor, values: Tensor, mask: MaskArgs) -> None:
    from seat_kernels.sparse_update import masked_swap_

    masked_swap_(param, values, mask.encoding, mask.index, mask.offsets, list(mask.ints))


ENTRY = _registry.register("masked_swap_", reference, {"cpu": _native, "cuda": _native, "triton": _triton})


def check(param, values, mask: MaskArgs, *, values_check: bool = True) -> None:
    _checks.tensor("param", param)
    _checks.tensor("values", values, ndim=1)
    if values.dtype != param.dtype:
        raise TypeError(f"values must have param's dtype {param.dtype}; got {values.dtype}")
    _encodings.check("mask", mask, param.numel(), "values", values, values=values_check)
    _checks.same_device(param=param, mask=mask.index, mask_offsets=mask.offsets, values=values)
    if values_check:
        _checks.no_aliasing((("param", param, True), ("values", values, True), ("mask", mask.index, False),
                             ("mask.offsets", mask.offsets, False)))


@torch.library.custom_op("seat::masked_swap_", mutates_args=("param", "values"))
def _masked_swap_op(param: Tensor, mask_index: Tensor, values: Tensor, mask_offsets: Optional[Tensor] = None,
                    encoding: int = _encodings.INDEX, mask_ints: Optional[List[int]] = None) -> None:
    mask = _encodings.from_op_args(mask_index, mask_offsets, encoding, mask_ints)
    check(param, values, mask)
    ENTRY.run(param.device, param, values, mask)


@_masked_swap_op.register_fake
def _(param, mask_index, values, mask_offsets=None, encoding=_encodings.INDEX, mask_ints=None):
    check(param, values, _encodings.from_op_args(mask_index, mask_offsets, encoding, mask_ints), values_check=False)


def masked_swap_(param: Tensor, mask, values: Tensor) -> None:
    """Exchange param.view(-1)[mask's entries] and values in place. See the module docstring."""
    args = _encodings.as_mask_args("mask", mask, param.numel() if isinstance(param, Tensor) else None)
    check(param, values, args, values_check=False)
    torch.ops.seat.masked_swap_(param, args.index, values, args.offsets, args.encoding, list(args.ints))
