"""Triton device functions of the AdamW step and of stochastic rounding, shared by the
compact (sparse_adamw, its block16 and implicit-mask variants) and dense-mask
(masked_adamw) kernels. Same math, same order as
python/seat/ops/_adamw.py and csrc/include/seat/adamw.h.
"""
from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def mix32(x):
    """32-bit integer hash (Mueller's) of a uint32 tensor."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def load_scalars(scalars_ptr, STATE_DT: tl.constexpr):
    """The 7 float64 host scalars of the step, cast to the state dtype."""
    decay = tl.load(scalars_ptr + 0).to(STATE_DT)
    one_minus_beta1 = tl.load(scalars_ptr + 1).to(STATE_DT)
    beta2 = tl.load(scalars_ptr + 2).to(STATE_DT)
    one_minus_beta2 = tl.load(scalars_ptr + 3).to(STATE_DT)
    eps = tl.load(scalars_ptr + 4).to(STATE_DT)
    step_size = tl.load(scalars_ptr + 5).to(STATE_DT)
    bc2_sqrt = tl.load(scalars_ptr + 6).to(STATE_DT)
    return decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt


@triton.jit
def adamw_step(w, g, m, v, vmax, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
               MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr):
    """One AdamW step per element: returns (w, m, v, vmax). IEEE sqrt and division so the
    result matches the CPU kernels and torch to rounding."""
    if MAXIMIZE:
        g = -g
    w = w * decay
    # exp_avg.lerp_(g, 1 - beta1) as torch computes it, from the nearer end: the same
    # rounding and the same non-finite results (inf gradient, weight >= 0.5: NaN);
    # one select per element, the coefficient's is a scalar (w - 1 is exact for w >= 0.5)
    near_m = one_minus_beta1 < 0.5
    m = tl.where(near_m, m, g) + tl.where(near_m, one_minus_beta1, one_minus_beta1 - 1.0) * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        # torch.maximum propagates NaN from either side; tl.maximum keeps the number
        vmax = tl.where((vmax >= v) | (vmax != vmax), vmax, v)
        second = vmax
    else:
        second = v
    if w.dtype == tl.float64:  # fp64 sqrt and division are IEEE already
        w = w - step_size * (m / (tl.sqrt(second) / bc2_sqrt + eps))
    else:
        w = w - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps)
    return w, m, v, vmax


@triton.jit
def round_to_param(w, pos, key, PARAM_DT: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The new weight in the param dtype.

    bf16 is rounded on the fp32 bit pattern: STOCHASTIC adds 16 random low bits
    (mix32(key ^ mix32(pos))), otherwise round-to-nearest-even adds 0x7FFF plus the
    lowest kept bit; then the low 16 bits are dropped. Done by hand, not with .to(),
    because the Triton interpreter truncates fp32 -> bf16 where the GPU rounds to
    nearest: this way both give the same bits. NaN passes through unchanged."""
    if PARAM_DT == tl.bfloat16:
        w32 = w.to(tl.float32)
        pattern = w32.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            increment = mix32(key ^ mix32(pos.to(tl.uint32))) & 0xFFFF
        else:
            increment = 0x7FFF + ((pattern >> 16) & 1)
        rounded = ((pattern + increment) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(w32 == w32, rounded, w32).to(PARAM_DT)
    return w.to(PARAM_DT)


@triton.jit
def update_entries(row, param, grad, exp_avg, exp_avg_sq, pos, at, slot, live, key,
                   decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                   MASTER_COL: tl.constexpr, AMSGRAD_COL: tl.constexpr, PARAM_DT: tl.constexpr,
                   STATE_DT: tl.constexpr, HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr,
                   MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """AdamW on the ``live`` trained entries of one tensor of a multi-tensor table, the
    part every mask encoding shares once it has found its entries: the gradient at
    grad[slot], the state (and fp32 master weight) at [at], the weight at param[pos]
    (all int64 / int32 tensors of one shape). ``row`` is the tensor's table row; its
    columns MASTER_COL and AMSGRAD_COL hold the master and max_exp_avg_sq pointers
    (read only when HAS_MASTER / AMSGRAD). ``key`` seeds stochastic rounding."""
    g = tl.load(grad + slot, mask=live, other=0.0).to(STATE_DT)  # bf16 -> fp32 is exact
    m = tl.load(exp_avg + at, mask=live, other=0.0)
    v = tl.load(exp_avg_sq + at, mask=live, other=0.0)
    if HAS_MASTER:
        master = tl.load(row + MASTER_COL).to(tl.pointer_type(STATE_DT))
        w = tl.load(master + at, mask=live, other=0.0)
    else:
        w = tl.load(param + pos, mask=live, other=0.0).to(STATE_DT)
    vmax = v
    if AMSGRAD:
        max_exp_avg_sq = tl.load(row + AMSGRAD_COL).to(tl.pointer_type(STATE_DT))
        vmax = tl.load(max_exp_avg_sq + at, mask=live, other=0.0)
    w, m, v, vmax = adamw_step(w, g, m, v, vmax, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                               bc2_sqrt, MAXIMIZE, AMSGRAD)
    tl.store(exp_avg + at, m, mask=live)
    tl.store(exp_avg_sq + at, v, mask=live)
    if AMSGRAD:
        tl.store(max_exp_avg_sq + at, vmax, mask=live)
    if HAS_MASTER:
        tl.store(master + at, w, mask=live)
    tl.store(param + pos, round_to_param(w, pos, key, PARAM_DT, STOCHASTIC and not HAS_MASTER), mask=live)
