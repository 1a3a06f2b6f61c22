"""Shared helpers of the loss-op tests (kl_div, paired_loss, fused_linear_paired_loss):
per op, input makers, the float64 oracle, a run on one backend and a check of one
against the other (kl_*, paired_*, fused_*); hostile rows and result classes (NaN / +inf
/ -inf / finite) for the non-finite rules; and calls returning the loss and the input
gradient, or the error raised (outcome), for the fuzz tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _loss_oracle import paired_terms
from conftest import tol
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


def loss_tol(dtype):
    """The losses accumulate in fp32 (fp64 for fp64 inputs) whatever the input dtype."""
    return tol(torch.float64 if dtype == torch.float64 else torch.float32)


# --------------------------------------------------------------------------- kl_div


def kl_randn(shape, dtype, seed, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def kl_pair(shape, dtype, seed, device="cpu"):
    """(cur, ref) logits of a fine-tuned and a base model: ref = cur + noise, KL ~ 0.5-3.

    Independent far-apart rows (log-ratios ~ 50) make the reverse-KL gradient
    p_cur * (log p_cur - log p_ref - KL) lose more than fp32 tolerance to cancellation in
    any fp32 implementation; close distributions are also the case that matters in SEAT."""
    cur = kl_randn(shape, torch.float64, seed, scale=2.5)
    ref = cur + kl_randn(shape, torch.float64, seed + 1000, scale=1.0)
    return cur.to(dtype).to(device), ref.to(dtype).to(device)


def kl_oracle_rows(cur, ref, temperature=1.0, reverse=False):
    """Per-row KL(p_ref || p_cur) (reverse: KL(p_cur || p_ref)) in float64 via F.kl_div."""
    log_cur = F.log_softmax(cur.double() / temperature, dim=-1)
    log_ref = F.log_softmax(ref.double() / temperature, dim=-1)
    # F.kl_div(input, target, log_target=True) = exp(target) * (target - input) = KL(target || input) terms.
    inp, target = (log_ref, log_cur) if reverse else (log_cur, log_ref)
    # 0 * log 0 = 0: entries the target rules out contribute nothing. Replace them in both
    # arguments so no NaN (-inf - -inf, 0 * -inf) reaches the forward or autograd.
    gone = target == -INF
    zero = torch.zeros((), dtype=torch.float64)
    terms = F.kl_div(torch.where(gone, zero, inp), torch.where(gone, zero, target), log_target=True, reduction="none")
    return torch.where(gone, zero, terms).sum(-1)


def kl_oracle(cur, ref, mask=None, *, temperature=1.0, reduction="mean", num_items=None, reverse=False,
           grad_output=None):
    """(loss, d loss / d cur) in float64 on the CPU; grad_output as for loss.backward()."""
    cur64 = cur.detach().cpu().double().requires_grad_()
    per_row = kl_oracle_rows(cur64, ref.detach().cpu(), temperature, reverse)
    if mask is not None:
        per_row = torch.where(mask.cpu(), per_row, torch.zeros((), dtype=torch.float64))
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        count = per_row.numel() if mask is None else int(mask.sum())
        loss = per_row.sum() / (num_items if num_items is not None else max(count, 1))
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.detach().cpu().double())
    return loss.detach(), cur64.grad


def kl_run(backend, cur, ref, mask=None, *, grad_output=None, **kwargs):
    """(loss, grad w.r.t. cur) from seat.ops.kl_div under `backend`, via .backward()."""
    cur = cur.detach().requires_grad_()
    with ops.use_backend(backend):
        loss = ops.kl_div(cur, ref, mask, **kwargs)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), cur.grad


def kl_check(backend, cur, ref, mask=None, *, grad_output=None, grad_tol=None, **kwargs):
    """Run the op and the kl_oracle on the same inputs and compare loss and gradient."""
    loss, grad = kl_run(backend, cur, ref, mask, grad_output=grad_output, **kwargs)
    expected_loss, expected_grad = kl_oracle(cur, ref, mask, grad_output=grad_output, **kwargs)
    out_dtype = torch.float64 if torch.float64 in (cur.dtype, ref.dtype) else torch.float32
    assert loss.dtype == out_dtype
    assert loss.shape == expected_loss.shape
    assert grad.dtype == cur.dtype and grad.shape == cur.shape
    torch.testing.assert_close(loss.cpu().double(), expected_loss, **loss_tol(cur.dtype))
    torch.testing.assert_close(grad.cpu().double(), expected_grad, **(grad_tol or tol(cur.dtype)))
    return loss, grad


# --------------------------------------------------------------------------- paired_loss


def paired_make_batch(n_ce, n_kl, vocab, dtype, seed, device, *, n_ignored=0, ignore_index=-100):
    """logits (x rows, then x~ rows), labels with n_ignored ignore_index entries, ref_logits.

    ref_logits = the x~ logits plus noise (a fine-tuned model stays close to its base)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_ce + n_kl, vocab, generator=g, dtype=torch.float64) * 2.5
    ref_logits = logits[n_ce:] + torch.randn(n_kl, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n_ce,), generator=g)
    labels[torch.randperm(n_ce, generator=g)[:n_ignored]] = ignore_index
    return logits.to(dtype).to(device), labels.to(device), ref_logits.to(dtype).to(device)


def paired_oracle(logits, labels, ref_logits, kl_mask=None, *, kl_weight=1.0, ignore_index=-100, temperature=1.0,
           reduction="mean", ce_num_items=None, kl_num_items=None, reverse_kl=False,
           combine=lambda loss, ce, kl: loss):
    """(loss, ce, kl, d combine(loss, ce, kl) / d logits) in float64 on the CPU."""
    x = logits.detach().cpu().double().requires_grad_()
    loss, ce, kl = paired_terms(x, labels, ref_logits, kl_mask, kl_weight=kl_weight, ignore_index=ignore_index,
                                temperature=temperature, reduction=reduction, ce_num_items=ce_num_items,
                                kl_num_items=kl_num_items, reverse_kl=reverse_kl)
    combine(loss, ce, kl).backward()
    return loss.detach(), ce.detach(), kl.detach(), x.grad


def paired_run(backend, logits, labels, ref_logits, kl_mask=None, *, combine=lambda loss, ce, kl: loss, **kwargs):
    """(loss, ce, kl, grad w.r.t. logits) from seat.ops.paired_loss, via combine(...).backward()."""
    x = logits.detach().requires_grad_()
    with ops.use_backend(backend):
        loss, ce, kl = ops.paired_loss(x, labels, ref_logits, kl_mask, **kwargs)
    combine(loss, ce, kl).backward()
    return loss.detach(), ce.detach(), kl.detach(), x.grad


def paired_check(backend, logits, labels, ref_logits, kl_mask=None, **kwargs):
    """Compare the op with the paired_oracle: the three outputs and the gradient."""
    got = paired_run(backend, logits, labels, ref_logits, kl_mask, **kwargs)
    expected = paired_oracle(logits, labels, ref_logits, kl_mask, **kwargs)
    out_dtype = torch.float64 if torch.float64 in (logits.dtype, ref_logits.dtype) else torch.float32
    for name, value, want in zip(("loss", "ce", "kl"), got[:3], expected[:3]):
        assert value.shape == () and value.dtype == out_dtype, name
        torch.testing.assert_close(value.cpu().double(), want, **loss_tol(logits.dtype), msg=lambda m: f"{name}: {m}")
    grad = got[3]
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad.cpu().double(), expected[3], **tol(logits.dtype))
    return got


# --------------------------------------------------------------------------- fused_linear_paired_loss
FUSED_N_CE, FUSED_N_KL, FUSED_HIDDEN, FUSED_VOCAB = 5, 4, 16, 37


def fused_make_inputs(dtype, seed, device, *, bias=False, n_ce=FUSED_N_CE, n_kl=FUSED_N_KL, hidden=FUSED_HIDDEN, vocab=FUSED_VOCAB, n_ignored=1):
    """dict(hidden, weight, labels, ref_hidden, bias): ref_hidden = the x~ rows plus noise."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_ce + n_kl, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (2.5 / hidden**0.5)
    ref_h = h[n_ce:] + 0.4 * torch.randn(n_kl, hidden, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, (n_ce,), generator=g)
    labels[torch.randperm(n_ce, generator=g)[:n_ignored]] = -100

    def cast(t):
        return None if t is None else t.to(dtype).to(device)

    return dict(hidden=cast(h), weight=cast(w), labels=labels.to(device), ref_hidden=cast(ref_h), bias=cast(b))


def fused_oracle(hidden, weight, labels, ref_hidden, kl_mask=None, bias=None, *, kl_weight=1.0, ignore_index=-100,
           temperature=1.0, reduction="mean", ce_num_items=None, kl_num_items=None, reverse_kl=False,
           combine=lambda loss, ce, kl: loss, **_):
    """(loss, ce, kl, d combine(loss, ce, kl) / d hidden) in float64 on the CPU."""
    h = hidden.detach().cpu().double().requires_grad_()
    w = weight.detach().cpu().double()
    b = None if bias is None else bias.detach().cpu().double()
    logits = F.linear(h, w, b)
    ref_logits = F.linear(ref_hidden.detach().cpu().double(), w, b)
    loss, ce, kl = paired_terms(logits, labels, ref_logits, kl_mask, kl_weight=kl_weight, ignore_index=ignore_index,
                                temperature=temperature, reduction=reduction, ce_num_items=ce_num_items,
                                kl_num_items=kl_num_items, reverse_kl=reverse_kl)
    combine(loss, ce, kl).backward()
    return loss.detach(), ce.detach(), kl.detach(), h.grad


def fused_run(backend, hidden, weight, labels, ref_hidden, kl_mask=None, bias=None, *,
        combine=lambda loss, ce, kl: loss, **kwargs):
    """(loss, ce, kl, grad w.r.t. hidden) from the op, via combine(loss, ce, kl).backward()."""
    h = hidden.detach().requires_grad_()
    with ops.use_backend(backend):
        loss, ce, kl = ops.fused_linear_paired_loss(h, weight, labels, ref_hidden, kl_mask, bias, **kwargs)
    combine(loss, ce, kl).backward()
    return loss.detach(), ce.detach(), kl.detach(), h.grad


def fused_check(backend, inputs, kl_mask=None, **kwargs):
    got = fused_run(backend, **inputs, kl_mask=kl_mask, **kwargs)
    expected = fused_oracle(**inputs, kl_mask=kl_mask, **kwargs)
    dtype = inputs["hidden"].dtype
    for name, value, want in zip(("loss", "ce", "kl"), got[:3], expected[:3]):
        assert value.shape == () and value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(value.cpu().double(), want, **loss_tol(dtype), msg=lambda m: f"{name}: {m}")
    grad = got[3]
    assert grad.dtype == dtype and grad.shape == inputs["hidden"].shape
    torch.testing.assert_close(grad.cpu().double(), expected[3], **tol(dtype))
    return got
