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

Kernels (cpu, cuda, triton: one chunked driver, `chunked` below, over each backend's
per-row kernel of paired_loss): rows are processed in chunks of chunk_size (0: as many
as keep a chunk's fp32 logits under CHUNK_BYTES = 64 MiB). Per chunk: logits =
hidden_chunk @ weight.T (+ bias) with fp32 accumulation (fp64 for fp64 hidden), the
matching ref_hidden rows' logits for x~ chunks, the per-row loss kernel, and at once
grad_hidden_chunk = grad_logits @ weight; so at most one chunk of logits (plus its ref
logits and gradient) exists at a time, never N x V. Chunks never straddle the x / x~
boundary, and each chunk's row count is padded to a multiple of ROW_MULTIPLE with ignored
rows, so the BLAS computes every row with the same micro-kernel whatever chunk_size is:
the result does not depend on chunk_size (bit for bit on the CPU, checked by the tests).
Low-precision weights: on the CPU the weight (and bias) is upcast once per call (a
V x H fp32 copy); on CUDA the products use torch.mm(..., out_dtype=float32) without a
copy, and the gradient's matmul rounds grad_logits to the weight dtype first (as other
fused-linear losses do). The CUDA path has not been run on a GPU yet.
Non-finite values and empty input: as paired_loss on the logits (its module docstring).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


from .._constants import IGNORE_INDEX
from . import _checks, _loss_rows, _registry
from .kl_div import no_grad_input
from .paired_loss import (
    block_scales,
    check_label_values,
    check_labels_and_mask,
    check_paired_options,
    combine_rows,
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


CHUNK_BYTES = 64 * 2**20  # a chunk's logits (accumulation dtype) stay under this (128 rows at V=128256)
ROW_MULTIPLE = 16  # chunk row counts are padded to this (BLAS row results then do not depend on the chunk)


def auto_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk when chunk_size=0: a multiple of ROW_MULTIPLE, logits <= CHUNK_BYTES."""
    rows = CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8)
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


class _Projection:
    """logits = h @ weight.T + bias and grad_h = grad_logits @ weight, in the accumulation
    dtype `acc` (see the module docstring for low-precision weights)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype):
        self.acc = acc
        self.mixed = weight.dtype != acc and weight.device.type == "cuda"
        self.weight = weight if self.mixed or weight.dtype == acc else weight.to(acc)
        self.bias = None if bias is None else bias.to(acc)

    def logits(self, h: Tensor) -> Tensor:
        if self.mixed:
            out = torch.mm(h, self.weight.t(), out_dtype=self.acc)
        else:
            out = torch.mm(h.to(self.acc), self.weight.t())
        if self.bias is not None:
            out += self.bias
        return out

    def grad_hidden(self, grad_logits: Tensor) -> Tensor:
        if self.mixed:
            return torch.mm(grad_logits.to(self.weight.dtype), self.weight, out_dtype=self.acc)
        return torch.mm(grad_logits, self.weight)


def _pad_rows(t: Tensor, pad: int, value=0) -> Tensor:
    if pad == 0:
        return t
    return torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])


def chunked(rows: _loss_rows.RowsKernel):
    """The fused_linear_paired_loss implementation on top of a per-row kernel `rows`."""

    def fused_linear_paired_loss_kernel(hidden, weight, labels, ref_hidden, kl_mask, bias, *, kl_weight, ignore_index,
                                        temperature, reduction, ce_num_items, kl_num_items, reverse_kl, chunk_size,
                                        compute_grad):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        device = hidden.device
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        n_ce = labels.shape[0]
        n_kl = n_rows - n_ce
        labels = labels.long().contiguous()
        ce_denom, kl_denom, scales = block_scales(
            labels, kl_mask, n_kl, ignore_index=ignore_index, temperature=temperature, reduction=reduction,
            ce_num_items=ce_num_items, kl_num_items=kl_num_items, dtype=acc, device=device)
        proj = _Projection(weight, bias, acc)
        chunk = chunk_size if chunk_size > 0 else auto_chunk_rows(vocab, acc)
        per_row = torch.empty(n_rows, dtype=acc, device=device)
        grad = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
        no_labels, no_ref = _loss_rows.empty_labels(device), torch.empty(0, vocab, dtype=acc, device=device)

        def run_chunk(first, count, logits, chunk_labels, ref_logits, valid):
            chunk_loss, grad_logits = rows(logits, chunk_labels, ref_logits, valid, scales, temperature,
                                           ignore_index, reverse_kl, compute_grad)
            per_row[first:first + count] = chunk_loss[:count]
            if compute_grad:
                grad[first:first + count] = proj.grad_hidden(grad_logits)[:count]

        for start in range(0, n_ce, chunk):  # x rows: cross-entropy
            count = min(chunk, n_ce - start)
            pad = -count % ROW_MULTIPLE  # padding rows carry ignore_index: zero loss and gradient
            run_chunk(start, count, proj.logits(_pad_rows(hidden[start:start + count], pad)),
                      _pad_rows(labels[start:start + count], pad, ignore_index), no_ref, _loss_rows.empty_mask(device))
        for start in range(0, n_kl, chunk):  # x~ rows: KL against the reference rows
            count = min(chunk, n_kl - start)
            pad = -count % ROW_MULTIPLE
            if kl_mask is not None:
                valid = _pad_rows(kl_mask[start:start + count], pad, False)
            elif pad:
                valid = _pad_rows(torch.ones(count, dtype=torch.bool, device=device), pad, False)
            else:
                valid = _loss_rows.empty_mask(device)
            run_chunk(n_ce + start, count, proj.logits(_pad_rows(hidden[n_ce + start:n_ce + start + count], pad)),
                      no_labels, proj.logits(_pad_rows(ref_hidden[start:start + count], pad)), valid)
        loss, ce, kl = combine_rows(per_row, n_ce, ce_denom, kl_denom, kl_weight)
        return loss, ce, kl, grad

    return fused_linear_paired_loss_kernel


_NATIVE = chunked(_loss_rows.native_rows)
ENTRY = _registry.register("fused_linear_paired_loss", reference,
                           {"cpu": _NATIVE, "cuda": _NATIVE, "triton": chunked(_loss_rows.triton_rows)})


def check(hidden, weight, labels, ref_hidden, kl_mask, bias, *, kl_weight, temperature, reduction, ce_num_items,
          kl_num_items, chunk_size) -> None:
    _checks.tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    _checks.tensor("ref_hidden", ref_hidden, dtypes=(hidden.dtype,), ndim=2)
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (the vocabulary); got shape {tuple(weight.shape)}")
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
    bias: Optional[Tensor] = None, *, kl_weight: float = 1.0, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0,
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
    with _loss_rows.wrapper_call():  # the gradient output is dropped here
        loss, ce, kl, _ = torch.ops.seat.fused_linear_paired_loss(
            hidden, weight, labels, ref_hidden, kl_mask, bias, ignore_index=int(ignore_index),
            reverse_kl=bool(reverse_kl), compute_grad=compute_grad, **options,
        )
    return loss, ce, kl
