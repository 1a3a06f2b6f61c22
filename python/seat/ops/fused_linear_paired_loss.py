"""fused_linear_paired_loss: the SEAT loss from hidden states and the frozen lm_head.

Same loss as paired_loss with logits = hidden @ weight.T (+ bias) for the current rows
and ref_hidden @ weight.T (+ bias) for the reference rows: SEAT freezes lm_head, so the
base and the fine-tuned model share it. Kernels compute it in chunks of rows so the
N x V logits never exist; the reference here materializes them (it is the oracle).
The gradient flows to `hidden` only: weight and bias must be frozen.

Shapes and dtypes:
  hidden     (N_ce + N_kl, H) float16 / bfloat16 / float32 / float64: differentiable.
  weight     (V, H) hidden's dtype; bias (V,) or None.
  labels     (N_ce,) int64 (int32 accepted); ref_hidden (N_kl, H) hidden's dtype: constant.
  kl_mask    (N_kl,) bool or None.
  chunk_size rows per chunk for the kernels (0: chosen by the kernel); the result does
             not depend on it.
  returns    (loss, ce, kl), as paired_loss.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks, _registry
from .kl_div import no_grad_input
from .paired_loss import (
    check_label_values,
    check_labels_and_mask,
    check_paired_options,
    paired_backward,
    paired_fake,
    paired_setup_context,
)
from .paired_loss import reference as paired_reference


def reference(hidden, weight, labels, ref_hidden, kl_mask, bias, *, kl_weight, ignore_index, temperature,
              reduction, ce_num_items, kl_num_items, reverse_kl, chunk_size, compute_grad):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    logits = torch.nn.functional.linear(hidden.to(dtype), w, b)
    ref_logits = torch.nn.functional.linear(ref_hidden.to(dtype), w, b)
    loss, ce, kl, grad_logits = paired_reference(
        logits, labels, ref_logits, kl_mask, kl_weight=kl_weight, ignore_index=ignore_index,
        temperature=temperature, reduction=reduction, ce_num_items=ce_num_items, kl_num_items=kl_num_items,
        reverse_kl=reverse_kl, compute_grad=compute_grad,
    )
    grad = (grad_logits @ w).to(hidden.dtype) if compute_grad else hidden.new_empty(0)
    return loss, ce, kl, grad


ENTRY = _registry.register("fused_linear_paired_loss", reference, {})


def check(hidden, weight, labels, ref_hidden, kl_mask, bias, *, kl_weight, temperature, reduction, ce_num_items,
          kl_num_items, chunk_size) -> None:
    _checks.tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    _checks.tensor("ref_hidden", ref_hidden, dtypes=(hidden.dtype,), ndim=2)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[1] = {hidden.shape[1]}; got {tuple(weight.shape)}")
    if ref_hidden.shape[1] != hidden.shape[1]:
        raise ValueError(f"ref_hidden must have hidden's width {hidden.shape[1]}; got {ref_hidden.shape[1]}")
    if bias is not None:
        _checks.tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have weight.shape[0] = {weight.shape[0]} entries; got {bias.shape[0]}")
    check_labels_and_mask(labels, kl_mask, hidden.shape[0], ref_hidden.shape[0], "hidden")
    _checks.same_device(hidden=hidden, weight=weight, labels=labels, ref_hidden=ref_hidden, kl_mask=kl_mask,
                        bias=bias)
    check_paired_options(kl_weight, temperature, reduction, ce_num_items, kl_num_items)
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 lets the kernel choose); got {chunk_size}")


@torch.library.custom_op("seat::fused_linear_paired_loss", mutates_args=())
def _fused_linear_paired_loss_op(
    hidden: Tensor, weight: Tensor, labels: Tensor, ref_hidden: Tensor, kl_mask: Optional[Tensor],
    bias: Optional[Tensor], *, kl_weight: float, ignore_index: int, temperature: float, reduction: str,
    ce_num_items: Optional[float], kl_num_items: Optional[float], reverse_kl: bool, chunk_size: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    options = dict(kl_weight=kl_weight, temperature=temperature, reduction=reduction, ce_num_items=ce_num_items,
                   kl_num_items=kl_num_items, chunk_size=chunk_size)
    check(hidden, weight, labels, ref_hidden, kl_mask, bias, **options)
    check_label_values(labels, weight.shape[0], ignore_index)
    return ENTRY.run(hidden.device, hidden, weight, labels, ref_hidden, kl_mask, bias, ignore_index=ignore_index,
                     reverse_kl=reverse_kl, compute_grad=compute_grad, **options)


@_fused_linear_paired_loss_op.register_fake
def _(hidden, weight, labels, ref_hidden, kl_mask, bias, *, kl_weight, ignore_index, temperature, reduction,
      ce_num_items, kl_num_items, reverse_kl, chunk_size, compute_grad):
    check(hidden, weight, labels, ref_hidden, kl_mask, bias, kl_weight=kl_weight, temperature=temperature,
          reduction=reduction, ce_num_items=ce_num_items, kl_num_items=kl_num_items, chunk_size=chunk_size)
    return paired_fake(hidden, ref_hidden, compute_grad)


_fused_linear_paired_loss_op.register_autograd(
    lambda ctx, g_loss, g_ce, g_kl, g_grad: (
        paired_backward(ctx, g_loss, g_ce, g_kl, g_grad), None, None, None, None, None),
    setup_context=paired_setup_context(labels_position=2),
)


def fused_linear_paired_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, ref_hidden: Tensor, kl_mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, *, kl_weight: float = 1.0, ignore_index: int = -100, temperature: float = 1.0,
    reduction: str = "mean", ce_num_items: Optional[float] = None, kl_num_items: Optional[float] = None,
    reverse_kl: bool = False, chunk_size: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ce, kl) of a paired batch from hidden states. See the module docstring."""
    options = dict(kl_weight=float(kl_weight), temperature=float(temperature), reduction=reduction,
                   ce_num_items=None if ce_num_items is None else float(ce_num_items),
                   kl_num_items=None if kl_num_items is None else float(kl_num_items), chunk_size=int(chunk_size))
    hidden, weight, labels, ref_hidden, kl_mask, bias = _checks.contiguous(
        hidden, weight, labels, ref_hidden, kl_mask, bias)
    check(hidden, weight, labels, ref_hidden, kl_mask, bias, **options)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name} requires grad, but fused_linear_paired_loss gives no gradient for the lm_head "
                f"(SEAT freezes it); call {name}.requires_grad_(False), or use paired_loss on logits"
            )
    no_grad_input("ref_hidden", ref_hidden)
    compute_grad = torch.is_grad_enabled() and hidden.requires_grad
    loss, ce, kl, _ = torch.ops.seat.fused_linear_paired_loss(
        hidden, weight, labels, ref_hidden, kl_mask, bias, ignore_index=int(ignore_index),
        reverse_kl=bool(reverse_kl), compute_grad=compute_grad, **options,
    )
    return loss, ce, kl
