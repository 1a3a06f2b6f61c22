"""Shared helpers of the loss-op tests (kl_div, paired_loss, fused_linear_paired_loss):
hostile rows, result classes (NaN / +inf / -inf / finite), and calls of each op on one
backend returning the loss and the input gradient (or the error raised)."""
from __future__ import annotations

import torch

from seat import ops

INF, NAN = float("inf"), float("nan")
CPU_BACKENDS = ("reference", "cpu", "triton")  # the backends a machine without a GPU runs

# Rows of 6 logits (KL pairs: cur, ref) that exercise every non-finite rule of the loss
# ops (see seat.ops.kl_div's module docstring).
_C = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5]
_R = [1.0, 0.0, -1.0, 0.5, 0.0, 2.0]


def _with(row, idx, value):
    out = list(row)
    for i in idx:
        out[i] = value
    return out


KL_ROWS = {
    "finite": (_C, _R),
    "ref-all-neg-inf": (_C, [-INF] * 6),
    "cur-all-neg-inf": ([-INF] * 6, _R),
    "both-all-neg-inf": ([-INF] * 6, [-INF] * 6),
    "ref-some-neg-inf": (_C, _with(_R, [1, 3], -INF)),
    "cur-some-neg-inf": (_with(_C, [1, 3], -INF), _R),
    "masked-vocab": (_with(_C, [1, 3], -INF), _with(_R, [1, 3], -INF)),
    "ref-nan": (_C, _with(_R, [2], NAN)),
    "cur-nan": (_with(_C, [2], NAN), _R),
    "ref-pos-inf": (_C, _with(_R, [2], INF)),
    "cur-pos-inf": (_with(_C, [2], INF), _R),
    "huge": ([v * 1e38 for v in _C], [v * 3e38 for v in _R]),
}

# (row, label) of cross-entropy rows
CE_ROWS = {
    "finite": ([0.0, 1.0, 2.0], 0),
    "nan": ([0.0, NAN, 1.0], 0),
    "pos-inf": ([0.0, INF, 1.0], 0),
    "all-neg-inf": ([-INF] * 3, 0),
    "label-neg-inf": ([-INF, 0.0, 1.0], 0),
    "other-neg-inf": ([0.0, -INF, 1.0], 0),
}


def result_class(t: torch.Tensor) -> torch.Tensor:
    """0 NaN, 1 +inf, 2 -inf, 3 finite, entry by entry."""
    t = t.detach().double().cpu()
    return torch.where(t.isnan(), 0, torch.where(t == INF, 1, torch.where(t == -INF, 2, 3)))


def same_class(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.equal(result_class(got), result_class(want))


def kl_div_call(backend, cur, ref, mask=None, **options):
    """(loss, grad w.r.t. cur) of seat.ops.kl_div on `backend` (grad None without backward)."""
    cur = cur.detach().clone().requires_grad_(cur.is_floating_point())
    with ops.use_backend(backend):
        loss = ops.kl_div(cur, ref, mask, **options)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), cur.grad


def paired_loss_call(backend, logits, labels, ref_logits, kl_mask=None, **options):
    """((loss, ce, kl), grad w.r.t. logits) of seat.ops.paired_loss on `backend`."""
    logits = logits.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss, ce, kl = ops.paired_loss(logits, labels, ref_logits, kl_mask, **options)
    (loss + ce + kl).backward()
    return (loss.detach(), ce.detach(), kl.detach()), logits.grad


def fused_call(backend, hidden, weight, labels, ref_hidden, kl_mask=None, bias=None, **options):
    """((loss, ce, kl), grad w.r.t. hidden) of seat.ops.fused_linear_paired_loss."""
    hidden = hidden.detach().clone().requires_grad_(True)
    with ops.use_backend(backend):
        loss, ce, kl = ops.fused_linear_paired_loss(hidden, weight, labels, ref_hidden, kl_mask, bias, **options)
    (loss + ce + kl).backward()
    return (loss.detach(), ce.detach(), kl.detach()), hidden.grad


def outcome(call, *args, **kwargs):
    """("ok", result) or ("error", (type, message)) of call(*args, **kwargs)."""
    try:
        return "ok", call(*args, **kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        return "error", (type(exc), str(exc))
