"""paired_loss: the SEAT loss on a paired batch, from logits.

  loss = CE(rows of x) + kl_weight * KL(p_ref || p_cur)(rows of x~)

The rows of `logits` are the x rows (cross-entropy against `labels`) followed by the x~
rows (KL against `ref_logits`, the frozen base model's logits at the same positions).

Shapes and dtypes:
  logits     (N_ce + N_kl, V) float16 / bfloat16 / float32 / float64: differentiable.
  labels     (N_ce,) int64 (int32 accepted): target ids, or ignore_index (no loss).
  ref_logits (N_kl, V) any float dtype: constant.
  kl_mask    (N_kl,) bool or None: x~ rows that count in the KL.
  returns    (loss, ce, kl): three scalars, float32 (float64 for float64 inputs).
CE: mean over non-ignored labels (or sum / ce_num_items); KL: mean over valid rows (or
sum / kl_num_items); reduction="sum" sums both. temperature applies to the KL only.

Backends: the per-row kernel of kl_div (cpu, cuda, triton; see kl_div's docstring for
dtypes) handles both blocks in one launch: rows before labels.numel() are CE rows.

Non-finite values and empty blocks follow kl_div's rules (its module docstring) for the
KL rows; kl_weight must be finite and >= 0, ce_num_items / kl_num_items finite and > 0.
A CE row holding a NaN or +inf logit, or all -inf, gives NaN loss and gradient (as
F.cross_entropy); a -inf logit at the label gives +inf loss and a finite gradient. An
empty block (no x rows, or no x~ rows) contributes 0 to the loss (a mean over no rows
is 0, not NaN), so paired_loss with labels of length 0 is a plain KL and with kl_weight
0 a plain CE; backward on zero rows gives an empty gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._constants import IGNORE_INDEX
from . import _checks, _loss_rows, _registry
from .kl_div import check_options, compute_dtype, kl_rows, no_grad_input, reduce_rows

PAIRED_REDUCTIONS = ("mean", "sum")


def ce_rows(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row cross-entropy, its gradient w.r.t. logits, and the valid-row mask."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()
    log_probs = torch.log_softmax(logits, dim=-1)
    per_row = -log_probs.gather(-1, target[:, None]).squeeze(-1)
    grad = log_probs.exp()
    grad.scatter_add_(-1, target[:, None], torch.full_like(per_row[:, None], -1.0))
    return per_row, grad, valid


def reference(logits, labels, ref_logits, kl_mask, *, kl_weight, ignore_index, temperature, reduction,
              ce_num_items, kl_num_items, reverse_kl, compute_grad):
    n_ce, vocab = labels.shape[0], logits.shape[-1]
    dtype = compute_dtype(logits, ref_logits)
    rows = logits.to(dtype)
    ce_per_row, ce_grad, ce_valid = ce_rows(rows[:n_ce], labels, ignore_index)
    ce, ce_grad = reduce_rows(ce_per_row, ce_grad, ce_valid, reduction, ce_num_items)
    kl_valid = (torch.ones(ref_logits.shape[0], dtype=torch.bool, device=logits.device)
                if kl_mask is None else kl_mask)
    kl_per_row, kl_grad = kl_rows(rows[n_ce:], ref_logits.to(dtype), temperature, reverse_kl)
    kl, kl_grad = reduce_rows(kl_per_row, kl_grad, kl_valid, reduction, kl_num_items)
    loss = ce + kl_weight * kl
    if compute_grad:
        # Rows keep their own term's unweighted gradient; backward applies kl_weight
        # and the output gradients per block (see paired_backward).
        grad = torch.cat([ce_grad, kl_grad]).to(logits.dtype)
    else:
        grad = logits.new_empty(0)
    assert grad.numel() == 0 or grad.shape == (n_ce + ref_logits.shape[0], vocab)
    return loss, ce, kl, grad


def block_scales(labels, kl_mask, n_kl, *, ignore_index, temperature, reduction, ce_num_items, kl_num_items, dtype,
                 device):
    """(ce_denom, kl_denom, scales): the denominators of both blocks (0-d tensors) and
    the (2,) gradient multipliers for the per-row kernel."""
    ce_denom = _loss_rows.denominator(labels != ignore_index, labels.shape[0], reduction, ce_num_items, dtype, device)
    kl_denom = _loss_rows.denominator(kl_mask, n_kl, reduction, kl_num_items, dtype, device)
    return ce_denom, kl_denom, _loss_rows.grad_scales(ce_denom, kl_denom, temperature)


def combine_rows(per_row, n_ce, ce_denom, kl_denom, kl_weight):
    """(loss, ce, kl) from the per-row losses (CE rows first)."""
    ce = per_row[:n_ce].sum() / ce_denom
    kl = per_row[n_ce:].sum() / kl_denom
    return ce + kl_weight * kl, ce, kl


def kernel(rows: _loss_rows.RowsKernel):
    """The paired_loss implementation on top of a backend's per-row kernel `rows`."""

    def paired_loss_kernel(logits, labels, ref_logits, kl_mask, *, kl_weight, ignore_index, temperature, reduction,
                           ce_num_items, kl_num_items, reverse_kl, compute_grad):
        n_ce = labels.shape[0]
        rows_in, ref, acc = _loss_rows.kernel_inputs(logits, ref_logits)
        device = logits.device
        labels = labels.long().contiguous()
        ce_denom, kl_denom, scales = block_scales(
            labels, kl_mask, ref.shape[0], ignore_index=ignore_index, temperature=temperature, reduction=reduction,
            ce_num_items=ce_num_items, kl_num_items=kl_num_items, dtype=acc, device=device)
        per_row, grad = rows(rows_in, labels, ref, _loss_rows.empty_mask(device) if kl_mask is None else kl_mask,
                             scales, temperature, ignore_index, reverse_kl, compute_grad)
        loss, ce, kl = combine_rows(per_row, n_ce, ce_denom, kl_denom, kl_weight)
        # Rows keep their own term's unweighted gradient (see paired_backward).
        grad = grad.to(logits.dtype) if compute_grad else logits.new_empty(0)
        return loss, ce, kl, grad

    return paired_loss_kernel


_NATIVE = kernel(_loss_rows.native_rows)
ENTRY = _registry.register("paired_loss", reference,
                           {"cpu": _NATIVE, "cuda": _NATIVE, "triton": kernel(_loss_rows.triton_rows)})


def check_labels_and_mask(labels, kl_mask, n_rows: int, n_kl: int, rows_name: str) -> None:
    _checks.tensor("labels", labels, dtypes=(torch.int64, torch.int32), ndim=1)
    if labels.shape[0] + n_kl != n_rows:
        raise ValueError(
            f"{rows_name} must have labels.numel() + N_kl = {labels.shape[0]} + {n_kl} rows "
            f"(x rows, then x~ rows); got {n_rows}"
        )
    if kl_mask is not None:
        _checks.tensor("kl_mask", kl_mask, dtypes=(torch.bool,), ndim=1)
        if kl_mask.shape[0] != n_kl:
            raise ValueError(f"kl_mask must have one entry per x~ row ({n_kl}); got {kl_mask.shape[0]}")


def check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    if labels.numel() == 0 or _checks.is_fake(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"labels holds {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def check_paired_options(kl_weight, temperature, reduction, ce_num_items, kl_num_items) -> None:
    _loss_rows.finite_scalar("kl_weight", kl_weight, inclusive=True)
    check_options(temperature, reduction, ce_num_items, PAIRED_REDUCTIONS, "ce_num_items", kl_items=False)
    check_options(temperature, reduction, kl_num_items, PAIRED_REDUCTIONS, "kl_num_items")


def check(logits, labels, ref_logits, kl_mask, *, kl_weight, temperature, reduction, ce_num_items,
          kl_num_items, values: bool = True) -> None:
    _checks.tensor("logits", logits, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.tensor("ref_logits", ref_logits, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have a non-empty vocabulary (second) dim; got shape {tuple(logits.shape)}")
    if ref_logits.shape[1] != logits.shape[1]:
        raise ValueError(f"ref_logits must have logits' vocabulary size {logits.shape[1]}; got {ref_logits.shape[1]}")
    check_labels_and_mask(labels, kl_mask, logits.shape[0], ref_logits.shape[0], "logits")
    _checks.same_device(logits=logits, labels=labels, ref_logits=ref_logits, kl_mask=kl_mask)
    check_paired_options(kl_weight, temperature, reduction, ce_num_items, kl_num_items)


def paired_fake(rows: Tensor, ref: Tensor, compute_grad: bool):
    """Fake outputs shared with fused_linear_paired_loss: three scalars and the gradient."""
    dtype = compute_dtype(rows, ref)
    scalar = rows.new_empty((), dtype=dtype)
    return scalar, scalar.clone(), scalar.clone(), rows.new_empty(rows.shape if compute_grad else (0,))


def paired_setup_context(labels_position: int):
    """setup_context for an op whose positional input `labels_position` is labels (its
    length is the number of x rows) and whose output 3 is the row gradient."""

    def setup_context(ctx, inputs, keyword_only_inputs, output):
        ctx.n_ce = inputs[labels_position].shape[0]
        ctx.kl_weight = keyword_only_inputs["kl_weight"]
        ctx.compute_grad = keyword_only_inputs["compute_grad"]
        ctx.set_materialize_grads(False)  # no zero-filled output gradients for unused outputs
        ctx.save_for_backward(output[3])
        _loss_rows.keep_grad_output_ref(ctx, output[3])

    return setup_context


def paired_backward(ctx, grad_loss, grad_ce, grad_kl, _grad_of_grad):
    """d/d rows = (g_loss + g_ce) * dCE on the x rows, (w * g_loss + g_kl) * dKL on x~."""
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:  # (zero rows give an empty gradient that is still the gradient)
        raise RuntimeError("seat.ops paired loss: backward needs compute_grad=True in the forward call")

    def coef(*terms):
        return sum(t for t in terms if t is not None)

    ce_scale = coef(grad_loss, grad_ce)
    kl_scale = coef(None if grad_loss is None else grad_loss * ctx.kl_weight, grad_kl)
    if _loss_rows.hands_on_saved_grad(ctx, ce_scale) and _loss_rows.hands_on_saved_grad(ctx, kl_scale):
        return grad.detach()  # both coefficients exactly 1: the saved rows are the gradient
    # one pass over the rows: each row times its block's coefficient
    row_scale = grad.new_empty((grad.shape[0], 1))
    row_scale[: ctx.n_ce] = ce_scale
    row_scale[ctx.n_ce:] = kl_scale
    return grad * row_scale


@torch.library.custom_op("seat::paired_loss", mutates_args=())
def _paired_loss_op(
    logits: Tensor, labels: Tensor, ref_logits: Tensor, kl_mask: Optional[Tensor], *, kl_weight: float,
    ignore_index: int, temperature: float, reduction: str, ce_num_items: Optional[float],
    kl_num_items: Optional[float], reverse_kl: bool, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    options = dict(kl_weight=kl_weight, temperature=temperature, reduction=reduction,
                   ce_num_items=ce_num_items, kl_num_items=kl_num_items)
    check(logits, labels, ref_logits, kl_mask, **options)
    check_label_values(labels, logits.shape[1], ignore_index)
    return ENTRY.run(logits.device, logits, labels, ref_logits, kl_mask, ignore_index=ignore_index,
                     reverse_kl=reverse_kl, compute_grad=compute_grad, **options)


@_paired_loss_op.register_fake
def _(logits, labels, ref_logits, kl_mask, *, kl_weight, ignore_index, temperature, reduction, ce_num_items,
      kl_num_items, reverse_kl, compute_grad):
    check(logits, labels, ref_logits, kl_mask, kl_weight=kl_weight, temperature=temperature,
          reduction=reduction, ce_num_items=ce_num_items, kl_num_items=kl_num_items)
    return paired_fake(logits, ref_logits, compute_grad)


_paired_loss_op.register_autograd(
    lambda ctx, g_loss, g_ce, g_kl, g_grad: (paired_backward(ctx, g_loss, g_ce, g_kl, g_grad), None, None, None),
    setup_context=paired_setup_context(labels_position=1),
)


def paired_loss(
    logits: Tensor, labels: Tensor, ref_logits: Tensor, kl_mask: Optional[Tensor] = None, *,
    kl_weight: float = 1.0, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0, reduction: str = "mean",
    ce_num_items: Optional[float] = None, kl_num_items: Optional[float] = None, reverse_kl: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ce, kl) of a paired batch from logits. See the module docstring."""
    options = dict(kl_weight=float(kl_weight), temperature=float(temperature), reduction=reduction,
                   ce_num_items=None if ce_num_items is None else float(ce_num_items),
                   kl_num_items=None if kl_num_items is None else float(kl_num_items))
    logits, labels, ref_logits, kl_mask = _checks.contiguous(logits, labels, ref_logits, kl_mask)
    check(logits, labels, ref_logits, kl_mask, **options)
    no_grad_input("ref_logits", ref_logits)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    with _loss_rows.wrapper_call():  # the gradient output is dropped here
        loss, ce, kl, _ = torch.ops.seat.paired_loss(
            logits, labels, ref_logits, kl_mask, ignore_index=int(ignore_index), reverse_kl=bool(reverse_kl),
            compute_grad=compute_grad, **options,
        )
    return loss, ce, kl
