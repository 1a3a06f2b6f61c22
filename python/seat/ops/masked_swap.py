"""masked_swap_(param, idx, values): swap param.view(-1)[idx] with values, in place.

The reference forward without a second model: swapping the stored original values into
the masked entries turns the fine-tuned model into the base model; swapping again turns
it back. Bit-exact (elements are moved, not converted), so two swaps are the identity.

Shapes and dtypes:
  param  (any)   any dtype, contiguous; param.view(-1)[idx] is exchanged.
  idx    (nnz,)  int32, sorted, unique, in [0, param.numel()).
  values (nnz,)  param.dtype, contiguous.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, _registry


def reference(param: Tensor, idx: Tensor, values: Tensor) -> None:
    flat = param.view(-1)
    index = idx.long()
    held = flat[index].clone()
    flat[index] = values
    values.copy_(held)


def _native(param: Tensor, idx: Tensor, values: Tensor) -> None:
    torch.ops.seat_C.masked_swap_(param, idx, values)


def _triton(param: Tensor, idx: Tensor, values: Tensor) -> None:
    from seat_kernels.masked_ops import masked_swap_

    masked_swap_(param, idx, values)


ENTRY = _registry.register("masked_swap_", reference, {"cpu": _native, "cuda": _native, "triton": _triton})


def check(param, idx, values, *, values_check: bool = True) -> None:
    _checks.tensor("param", param)
    _checks.index_tensor("idx", idx, param.numel())
    _checks.tensor("values", values, ndim=1)
    if values.dtype != param.dtype:
        raise TypeError(f"values must have param's dtype {param.dtype}; got {values.dtype}")
    _checks.same_numel("values", values, "idx", idx)
    _checks.same_device(param=param, idx=idx, values=values)
    if values_check:
        _checks.index_values("idx", idx, param.numel())


@torch.library.custom_op("seat::masked_swap_", mutates_args=("param", "values"))
def _masked_swap_op(param: Tensor, idx: Tensor, values: Tensor) -> None:
    check(param, idx, values)
    ENTRY.run(param.device, param, idx, values)


@_masked_swap_op.register_fake
def _(param, idx, values):
    check(param, idx, values, values_check=False)


def masked_swap_(param: Tensor, idx: Tensor, values: Tensor) -> None:
    """Exchange param.view(-1)[idx] and values in place. See the module docstring."""
    check(param, idx, values, values_check=False)
    torch.ops.seat.masked_swap_(param, idx, values)
