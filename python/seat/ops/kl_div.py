"""kl_div: per-token KL between the current and the reference next-token distributions.

  forward (default): KL(p_ref || p_cur) = sum_v p_ref(v) * (log p_ref(v) - log p_cur(v))
  reverse=True:      KL(p_cur || p_ref)
with p = softmax(logits / temperature) over the last dim (no temperature**2 factor).
The gradient w.r.t. logits_cur is produced together with the loss (kernels do both in
one pass over the vocabulary); backward only scales it by grad_output.

Shapes and dtypes:
  logits_cur (..., V) float16 / bfloat16 / float32 / float64: differentiable.
  logits_ref (..., V) same shape, any float dtype: constant (must not require grad).
  mask       (...)    bool or None: rows that count (False rows give 0 loss, 0 grad).
  returns    ()  for reduction "mean" (over valid rows, or divided by num_items) / "sum",
             (...) for "none"; float32 (float64 if an input is float64).
Accumulation is in fp32 (fp64 for fp64 inputs) whatever the input dtype.

Backends (python/seat/ops/_loss_rows.py holds the shared glue): one fused per-row kernel
(online log-softmax of both inputs in one pass -> loss, a second pass -> gradient)
  cpu     C++ / OpenMP (csrc/cpu/kl_div.cpp): fp16 / bf16 / fp32 in any mix (fp32
          accumulation), fp64 (fp64 accumulation).
  cuda    CUDA C++ (csrc/cuda/kl_div.cu): the same dtypes and accumulation as cpu.
  triton  seat_kernels/kl_div.py: the same dtypes and accumulation as cpu.
A float64 input upcasts the other input to float64 before the kernel (as the reference
computes in float64 then). The per-row losses are summed and divided in torch.

Non-finite values and empty input. `reference` below defines them and every backend
gives the same class of result (NaN, +inf, -inf or finite) entry for entry:
  - temperature must be finite, > 0 and >= MIN_TEMPERATURE (~2.9e-39: 1/temperature a
    finite float32); num_items finite, > 0 and with num_items * temperature >=
    MIN_TEMPERATURE (the gradient scale 1/(num_items * temperature) a finite float32).
    Anything else is refused (ValueError).
  - A -inf logit is probability 0. Entries where the KL target (p_ref; reverse=True:
    p_cur) has no mass contribute 0 (0 * log 0 = 0, as F.kl_div with probabilities; its
    log_target=True form gives NaN there), so masked vocabulary entries (-inf in both
    inputs, or only in the target) give finite results.
  - Target mass where the other distribution has none (-inf there): that row's KL is
    +inf, as F.kl_div gives; the gradient of forward KL stays finite, that of reverse
    KL is NaN where p_cur > 0.
  - A row without a distribution (all -inf, or holding a NaN or +inf) in either input:
    NaN loss and NaN gradient (softmax is 0/0 there; torch.log_softmax gives NaN too),
    except that the reverse-KL gradient is 0 where p_cur == 0. A row with mask False
    gives 0 loss and 0 gradient whatever it holds.
  - Zero rows: reduction "none" gives an empty tensor, "sum" 0, "mean" 0 (torch gives
    0/0 = NaN there; here the mean's denominator is max(valid rows, 1), the rule that
    also makes all-masked batches 0), and backward gives an empty gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._constants import IGNORE_INDEX
from . import _checks, _loss_rows, _registry


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kl_rows(cur: Tensor, ref: Tensor, temperature: float, reverse: bool) -> tuple[Tensor, Tensor]:
    """Per-row KL and its gradient w.r.t. the un-tempered cur logits (rows of (N, V)).
    This defines the non-finite cases every backend follows (see the module docstring)."""
    # logits * (1/T) with 1/T rounded to the compute dtype, as the kernels scale them
    inv_t = 1.0 / temperature
    log_cur = torch.log_softmax(cur * inv_t, dim=-1)
    log_ref = torch.log_softmax(ref * inv_t, dim=-1)
    p_cur, p_ref = log_cur.exp(), log_ref.exp()
    zero = torch.zeros((), dtype=cur.dtype, device=cur.device)
    # 0 * log 0 = 0: entries without target mass contribute nothing; a NaN p (a NaN,
    # +inf or all -inf row) is not 0 and stays NaN.
    if not reverse:
        per_row = torch.where(p_ref == 0, zero, p_ref * (log_ref - log_cur)).sum(-1)
        grad = (p_cur - p_ref) * inv_t
    else:
        per_row = torch.where(p_cur == 0, zero, p_cur * (log_cur - log_ref)).sum(-1)
        grad = torch.where(p_cur == 0, zero, p_cur * (log_cur - log_ref - per_row[:, None])) * inv_t
    return per_row, grad


def reduce_rows(per_row: Tensor, grad: Tensor, valid: Tensor, reduction: str, num_items: Optional[float]):
    """Zero invalid rows, then reduce: returns (loss, grad) with grad scaled to match."""
    zero = torch.zeros((), dtype=per_row.dtype, device=per_row.device)
    per_row = torch.where(valid, per_row, zero)
    grad = torch.where(valid[:, None], grad, zero)
    if reduction == "none":
        return per_row, grad
    if reduction == "sum":
        return per_row.sum(), grad
    denom = float(num_items) if num_items is not None else max(int(valid.sum()), 1)
    return per_row.sum() / denom, grad / denom


def reference(logits_cur, logits_ref, mask, *, temperature, reduction, num_items, reverse, compute_grad):
    shape, vocab = logits_cur.shape[:-1], logits_cur.shape[-1]
    dtype = compute_dtype(logits_cur, logits_ref)
    cur = logits_cur.reshape(-1, vocab).to(dtype)
    ref = logits_ref.reshape(-1, vocab).to(dtype)
    valid = torch.ones(cur.shape[0], dtype=torch.bool, device=cur.device) if mask is None else mask.reshape(-1)
    per_row, grad = kl_rows(cur, ref, temperature, reverse)
    loss, grad = reduce_rows(per_row, grad, valid, reduction, num_items)
    if reduction == "none":
        loss = loss.reshape(shape)
    grad = grad.reshape(logits_cur.shape).to(logits_cur.dtype) if compute_grad else logits_cur.new_empty(0)
    return loss, grad


def kernel(rows: _loss_rows.RowsKernel):
    """The kl_div implementation on top of a backend's per-row kernel `rows`."""

    def kl_div_kernel(logits_cur, logits_ref, mask, *, temperature, reduction, num_items, reverse, compute_grad):
        shape, vocab = logits_cur.shape[:-1], logits_cur.shape[-1]
        cur, ref, acc = _loss_rows.kernel_inputs(logits_cur.reshape(-1, vocab), logits_ref.reshape(-1, vocab))
        device = cur.device
        valid = None if mask is None else mask.reshape(-1)
        denom = _loss_rows.denominator(valid, cur.shape[0], reduction, num_items, acc, device)
        scales = _loss_rows.grad_scales(torch.ones((), dtype=acc, device=device), denom, temperature)
        per_row, grad = rows(cur, _loss_rows.empty_labels(device), ref,
                             _loss_rows.empty_mask(device) if valid is None else valid, scales, temperature, IGNORE_INDEX,
                             reverse, compute_grad)
        if reduction == "none":
            loss = per_row.reshape(shape)
        elif reduction == "sum":
            loss = per_row.sum()
        else:
            loss = per_row.sum() / denom
        grad = grad.reshape(logits_cur.shape).to(logits_cur.dtype) if compute_grad else logits_cur.new_empty(0)
        return loss, grad

    return kl_div_kernel


_NATIVE = kernel(_loss_rows.native_rows)
ENTRY = _registry.register("kl_div", reference,
                           {"cpu": _NATIVE, "cuda": _NATIVE, "triton": kernel(_loss_rows.triton_rows)})


def check_options(temperature: float, reduction: str, num_items: Optional[float], reductions=_checks.REDUCTIONS,
                  num_items_name: str = "num_items", kl_items: bool = True):
    """kl_items: num_items divides a KL block, whose gradient also carries 1/temperature."""
    _loss_rows.check_temperature(temperature)
    _checks.choice("reduction", reduction, reductions)
    if num_items is not None:
        if reduction != "mean":
            raise ValueError(f"{num_items_name} divides the summed loss; it needs reduction='mean', not {reduction!r}")
        _loss_rows.check_num_items(num_items_name, num_items, temperature if kl_items else 1.0)


def check(logits_cur, logits_ref, mask, temperature, reduction, num_items) -> None:
    _checks.tensor("logits_cur", logits_cur, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("logits_ref", logits_ref, dtypes=_checks.FLOAT_DTYPES)
    if logits_cur.dim() < 1 or logits_cur.shape[-1] < 1:
        raise ValueError(f"logits_cur must have a non-empty last (vocabulary) dim; got shape {tuple(logits_cur.shape)}")
    if logits_ref.shape != logits_cur.shape:
        raise ValueError(
            f"logits_ref must have logits_cur's shape {tuple(logits_cur.shape)}; got {tuple(logits_ref.shape)}"
        )
    if mask is not None:
        _checks.tensor("mask", mask, dtypes=(torch.bool,))
        if mask.shape != logits_cur.shape[:-1]:
            raise ValueError(
                f"mask must have shape {tuple(logits_cur.shape[:-1])} (logits without the vocabulary dim); "
                f"got {tuple(mask.shape)}"
            )
    _checks.same_device(logits_cur=logits_cur, logits_ref=logits_ref, mask=mask)
    check_options(temperature, reduction, num_items)


@torch.library.custom_op("seat::kl_div", mutates_args=())
def _kl_div_op(
    logits_cur: Tensor, logits_ref: Tensor, mask: Optional[Tensor], *, temperature: float, reduction: str,
    num_items: Optional[float], reverse: bool, compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    check(logits_cur, logits_ref, mask, temperature, reduction, num_items)
    return ENTRY.run(logits_cur.device, logits_cur, logits_ref, mask, temperature=temperature,
                     reduction=reduction, num_items=num_items, reverse=reverse, compute_grad=compute_grad)


@_kl_div_op.register_fake
def _(logits_cur, logits_ref, mask, *, temperature, reduction, num_items, reverse, compute_grad):
    check(logits_cur, logits_ref, mask, temperature, reduction, num_items)
    dtype = compute_dtype(logits_cur, logits_ref)
    shape = logits_cur.shape[:-1] if reduction == "none" else ()
    loss = logits_cur.new_empty(shape, dtype=dtype)
    grad = logits_cur.new_empty(logits_cur.shape if compute_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.reduction = keyword_only_inputs["reduction"]
    ctx.compute_grad = keyword_only_inputs["compute_grad"]
    # The unused gradient output would otherwise get an N x V tensor of zeros as its
    # output gradient in every backward (a fill as long as the kernel's gradient pass).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    _loss_rows.keep_grad_output_ref(ctx, output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:  # (zero rows give an empty gradient that is still the gradient)
        raise RuntimeError("seat.ops.kl_div: backward needs compute_grad=True in the forward call")
    if grad_loss is None:  # only the gradient output was used: it has no gradient
        return None, None, None
    if ctx.reduction != "none" and _loss_rows.hands_on_saved_grad(ctx, grad_loss):
        return grad.detach(), None, None
    scale = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
    return grad * scale.to(grad.dtype), None, None


_kl_div_op.register_autograd(_backward, setup_context=_setup_context)


def no_grad_input(name: str, t: Optional[Tensor]) -> None:
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but this op treats it as a constant (the frozen base model); "
            f"pass {name}.detach() or compute it under torch.no_grad()"
        )


def kl_div(
    logits_cur: Tensor, logits_ref: Tensor, mask: Optional[Tensor] = None, *, temperature: float = 1.0,
    reduction: str = "mean", num_items: Optional[float] = None, reverse: bool = False,
) -> Tensor:
    """Per-token KL(p_ref || p_cur) (reverse=True: KL(p_cur || p_ref)). See the module docstring."""
    temperature = float(temperature)
    num_items = None if num_items is None else float(num_items)
    logits_cur, logits_ref, mask = _checks.contiguous(logits_cur, logits_ref, mask)
    check(logits_cur, logits_ref, mask, temperature, reduction, num_items)
    no_grad_input("logits_ref", logits_ref)
    compute_grad = torch.is_grad_enabled() and logits_cur.requires_grad
    with _loss_rows.wrapper_call():  # the gradient output is dropped here
        loss, _ = torch.ops.seat.kl_div(
            logits_cur, logits_ref, mask, temperature=temperature, reduction=reduction, num_items=num_items,
            reverse=bool(reverse), compute_grad=compute_grad,
        )
    return loss
