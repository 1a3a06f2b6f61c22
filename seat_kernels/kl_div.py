"""Triton kernel of the fused log-softmax losses (kl_div, paired_loss and, per chunk,
fused_linear_paired_loss): one program per row of logits.

  CE row (row < n_ce):  loss = lse(x) - x[label]; grad = (softmax(x) - onehot) * scales[0]
  KL row:               loss = KL(p_ref || p_cur) (REVERSE: KL(p_cur || p_ref)), p =
                        softmax(logits * inv_t); grad w.r.t. cur logits * scales[1]
Pass 1 walks the row in BLOCK-wide tiles keeping an online log-softmax (running max m,
running sum s of e^{x - m}, and the KL weight sum a) of both inputs at once; pass 2
re-reads the row and writes the gradient. Same formulas as csrc/include/seat/kl_div.h:
KL = a_t / s_t - (lse_t - lse_o) with a_t = sum_{t > -inf} e^{t - m_t} (t - o), so
identical inputs give exactly 0 and -inf entries of the target contribute 0 (0 log 0 = 0).
Accumulation in float32, or float64 for float64 inputs (ACC).

The launch wrapper takes inputs already validated by seat.ops (see
python/seat/ops/_loss_rows.py for the argument contract).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._spec import AotSpec

MAX_BLOCK = 4096  # 16 fp32 values per thread and tile at 8 warps: no spills at V = 128K


@triton.jit
def _online_tile(m, s, a, t, o):
    """Merge tile t (KL weights t - o) into the running (m, s, a); -inf entries add 0."""
    new_m = tl.maximum(m, tl.max(t, 0))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: keep s = a = 0
    k = tl.exp(m - safe_m)
    e = tl.exp(t - safe_m)
    s = s * k + tl.sum(e, 0)
    # Only entries with mass (e > 0, like the reference's p > 0) weigh in; zeroing t and o
    # first keeps -inf - -inf (NaN) out of the arithmetic altogether.
    has_mass = e > 0
    w = tl.where(has_mass, t, 0.0) - tl.where(has_mass, o, 0.0)
    a = a * k + tl.sum(e * w, 0)
    return new_m, s, a


@triton.jit
def _zero_row(g_ptr, loss_ptr, vocab, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """An ignored / masked row: loss 0 and (when asked) a zero gradient row."""
    tl.store(loss_ptr, 0.0)
    if COMPUTE_GRAD:
        offs = tl.arange(0, BLOCK)
        for v0 in tl.range(0, vocab, BLOCK):
            cols = v0 + offs
            tl.store(g_ptr + cols, tl.zeros([BLOCK], g_ptr.dtype.element_ty), mask=cols < vocab)


@triton.jit
def _ce_row(x_ptr, g_ptr, loss_ptr, label, scales_ptr, vocab, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
            BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    a = tl.zeros([], ACC)
    for v0 in tl.range(0, vocab, BLOCK):
        cols = v0 + offs
        x = tl.load(x_ptr + cols, mask=cols < vocab, other=float("-inf")).to(ACC)
        m, s, a = _online_tile(m, s, a, x, x)
    ls = tl.log(s)  # p = e^{(x - m) - log s}: keeps fp32 digits that x - lse would round off
    tl.store(loss_ptr, (m - tl.load(x_ptr + label).to(ACC)) + ls)
    if COMPUTE_GRAD:
        factor = tl.load(scales_ptr).to(ACC)
        for v0 in tl.range(0, vocab, BLOCK):
            cols = v0 + offs
            live = cols < vocab
            x = tl.load(x_ptr + cols, mask=live, other=float("-inf")).to(ACC)
            p = tl.exp((x - m) - ls)
            g = tl.where(cols == label, p - 1.0, p) * factor
            tl.store(g_ptr + cols, g.to(g_ptr.dtype.element_ty), mask=live)


@triton.jit
def _kl_row(x_ptr, r_ptr, g_ptr, loss_ptr, scales_ptr, vocab, REVERSE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
            ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    inv_t = tl.load(scales_ptr + 2).to(ACC)
    mc = tl.full([], float("-inf"), ACC)
    sc = tl.zeros([], ACC)
    ac = tl.zeros([], ACC)
    mr = tl.full([], float("-inf"), ACC)
    sr = tl.zeros([], ACC)
    ar = tl.zeros([], ACC)
    for v0 in tl.range(0, vocab, BLOCK):
        cols = v0 + offs
        live = cols < vocab
        c = tl.load(x_ptr + cols, mask=live, other=float("-inf")).to(ACC) * inv_t
        q = tl.load(r_ptr + cols, mask=live, other=float("-inf")).to(ACC) * inv_t
        mc, sc, ac = _online_tile(mc, sc, ac, c, q)
        mr, sr, ar = _online_tile(mr, sr, ar, q, c)
    ls_c = tl.log(sc)
    ls_r = tl.log(sr)
    dlse = (mc - mr) + (ls_c - ls_r)  # lse_c - lse_r, exactly 0 for identical rows
    if REVERSE:
        kl = ac / sc - dlse
    else:
        kl = ar / sr + dlse
    tl.store(loss_ptr, kl)
    if COMPUTE_GRAD:
        factor = tl.load(scales_ptr + 1).to(ACC)
        for v0 in tl.range(0, vocab, BLOCK):
            cols = v0 + offs
            live = cols < vocab
            c = tl.load(x_ptr + cols, mask=live, other=float("-inf")).to(ACC) * inv_t
            q = tl.load(r_ptr + cols, mask=live, other=float("-inf")).to(ACC) * inv_t
            if REVERSE:
                # (c - q) - (lse_c - lse_r): equal logits cancel exactly, even at |x| ~ 1e4
                p = tl.exp((c - mc) - ls_c)
                has_mass = p != 0  # the reference's torch.where(p_cur == 0, 0, ...): NaN stays NaN
                lr = tl.where(has_mass, c, 0.0) - tl.where(has_mass, q, 0.0)
                g = tl.where(has_mass, p * ((lr - dlse) - kl) * factor, 0.0)
            else:
                g = (tl.exp((c - mc) - ls_c) - tl.exp((q - mr) - ls_r)) * factor
            tl.store(g_ptr + cols, g.to(g_ptr.dtype.element_ty), mask=live)


@triton.jit
def paired_rows_kernel(logits_ptr, ref_ptr, labels_ptr, valid_ptr, scales_ptr, loss_ptr, grad_ptr, n_ce, vocab,
                       ignore_index, REVERSE: tl.constexpr, HAS_VALID: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Row program_id(0) of logits: a CE row (< n_ce) or a KL row against ref row - n_ce.
    scales_ptr: [CE grad factor, KL grad factor, 1 / temperature] in the ACC dtype."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = logits_ptr + row * vocab
    g_ptr = grad_ptr + row * vocab
    loss_ptr = loss_ptr + row
    if row < n_ce:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            _zero_row(g_ptr, loss_ptr, vocab, COMPUTE_GRAD, BLOCK)
        else:
            _ce_row(x_ptr, g_ptr, loss_ptr, label, scales_ptr, vocab, COMPUTE_GRAD, ACC, BLOCK)
    else:
        k = row - n_ce
        r_ptr = ref_ptr + k * vocab
        if HAS_VALID:
            if tl.load(valid_ptr + k) != 0:
                _kl_row(x_ptr, r_ptr, g_ptr, loss_ptr, scales_ptr, vocab, REVERSE, COMPUTE_GRAD, ACC, BLOCK)
            else:
                _zero_row(g_ptr, loss_ptr, vocab, COMPUTE_GRAD, BLOCK)
        else:
            _kl_row(x_ptr, r_ptr, g_ptr, loss_ptr, scales_ptr, vocab, REVERSE, COMPUTE_GRAD, ACC, BLOCK)


def block_for(vocab: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 16)))


def paired_rows(logits, labels, ref_logits, kl_valid, scales, temperature, ignore_index, reverse, compute_grad):
    """(per_row, grad): the contract of python/seat/ops/_loss_rows.py."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_rows, vocab = logits.shape
    n_ce = labels.numel()
    per_row = torch.empty(n_rows, dtype=acc, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    if n_rows == 0:
        return per_row, grad
    # 1/T joins the factors in device memory: a float argument would be rounded to fp32.
    factors = torch.cat([scales.to(acc), scales.new_full((1,), 1.0 / temperature, dtype=acc)])
    has_valid = kl_valid.numel() > 0
    # Pointers the kernel never dereferences still need a tensor of the right type.
    labels = labels if labels.numel() else torch.zeros(1, dtype=torch.int64, device=logits.device)
    block = block_for(vocab)
    paired_rows_kernel[(n_rows,)](
        logits, ref_logits if ref_logits.numel() else logits, labels,
        kl_valid.view(torch.uint8) if has_valid else per_row, factors, per_row, grad if compute_grad else per_row,
        n_ce, vocab, ignore_index, REVERSE=bool(reverse), HAS_VALID=has_valid,
        COMPUTE_GRAD=bool(compute_grad), ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block,
        num_warps=8 if block >= 2048 else 4)
    return per_row, grad


_TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def _spec(dtype: str, reverse: bool, has_valid: bool, compute_grad: bool) -> AotSpec:
    flags = "".join(f for f, on in (("+reverse", reverse), ("+mask", has_valid), ("+grad", compute_grad)) if on)
    return AotSpec(
        f"paired_rows_kernel[{dtype}{flags}]", paired_rows_kernel,
        {"logits_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "labels_ptr": "*i64", "valid_ptr": "*u8",
         "scales_ptr": "*fp32", "loss_ptr": "*fp32", "grad_ptr": f"*{dtype}", "n_ce": "i64", "vocab": "i32",
         "ignore_index": "i64", "REVERSE": "constexpr", "HAS_VALID": "constexpr", "COMPUTE_GRAD": "constexpr",
         "ACC": "constexpr", "BLOCK": "constexpr"},
        {"REVERSE": reverse, "HAS_VALID": has_valid, "COMPUTE_GRAD": compute_grad, "ACC": tl.float32,
         "BLOCK": MAX_BLOCK},
        num_warps=8)


# The training configurations (V = 128K: BLOCK = 4096, 8 warps): fp32 and bf16 logits,
# forward KL with a mask and the gradient, reverse KL, and the loss-only (eval) variant.
AOT_SPECS = [
    _spec("fp32", False, True, True),
    _spec("bf16", False, True, True),
    _spec("bf16", True, True, True),
    _spec("bf16", False, False, False),
]
