// Per-row math of the fused log-softmax losses (kl_div, paired_loss) shared by the CPU
// (csrc/cpu/kl_div.cpp) and CUDA (csrc/cuda/kl_div.cu) kernels; the Triton kernel
// (seat_kernels/kl_div.py) follows the same formulas. Plain C++ (no torch headers).
//
// A KL row compares a "target" distribution t with an "other" o (forward KL(p_ref ||
// p_cur): t = ref, o = cur; reverse: t = cur, o = ref), both softmax(logits / T):
//   KL = sum_{t_v > -inf} p_t(v) (log p_t(v) - log p_o(v))
//      = A_t / S_t - (lse_t - lse_o),   A_t = sum_{t_v > -inf} e^{t_v - m_t} (t_v - o_v)
// with lse = m + log S from an online (running max m, running sum S of e^{x - m}) pass.
// Written this way, identical inputs give A_t = 0 and lse_t == lse_o bit for bit, so
// the loss (and the gradient below) is exactly zero, and entries with p_t = 0 (-inf
// logits) contribute nothing (0 * log 0 = 0), as the torch reference does with
// torch.where(p == 0, 0, ...). Rows without a distribution (all -inf, or a NaN / +inf
// logit) come out NaN, as in the reference (python/seat/ops/kl_div.py).
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "seat/common.h"

// Host builds force inlining: the CPU kernel calls these from functions compiled for
// several ISAs (tile_kernels), and only inlined code gets each copy's vector units.
#if defined(__CUDACC__) || !defined(__GNUC__)
#define SEAT_KL_HD SEAT_HD
#else
#define SEAT_KL_HD inline __attribute__((always_inline))
#endif

namespace seat {

template <typename T>
SEAT_KL_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

SEAT_KL_HD float seat_exp(float x) { return expf(x); }
SEAT_KL_HD double seat_exp(double x) { return exp(x); }
SEAT_KL_HD float seat_log(float x) { return logf(x); }
SEAT_KL_HD double seat_log(double x) { return log(x); }

// Running log-sum-exp of one row: max m, sum s = sum e^{x - m}, and the weighted sum
// a = sum e^{x - m} * w (w = t - o for the KL target; unused otherwise).
template <typename T>
struct OnlineLse {
  T m, s, a;
};

template <typename T>
SEAT_KL_HD OnlineLse<T> online_init() {
  return {neg_inf<T>(), T(0), T(0)};
}

// Add one element. -inf (probability 0) is skipped, so a row that starts with -inf
// entries never evaluates -inf - -inf; NaN is not skipped and propagates like torch.
template <typename T>
SEAT_KL_HD void online_add(OnlineLse<T>& st, T x, T w) {
  if (x == neg_inf<T>()) return;
  if (x <= st.m) {
    const T e = seat_exp(x - st.m);
    st.s += e;
    st.a += e > T(0) ? e * w : T(0);  // underflowed mass weighs nothing (reference: p > 0)
  } else {  // new maximum: rescale what was summed so far (e^{-inf} = 0 on the first)
    const T k = seat_exp(st.m - x);
    st.s = st.s * k + T(1);
    st.a = st.a * k + w;
    st.m = x;
  }
}

// Merge two partial states (parallel reduction; tile-wise accumulation on the CPU).
template <typename T>
SEAT_KL_HD OnlineLse<T> online_merge(const OnlineLse<T>& x, const OnlineLse<T>& y) {
  if (x.m == neg_inf<T>()) return y;
  if (y.m == neg_inf<T>()) return x;
  const T m = x.m > y.m ? x.m : y.m;
  const T kx = seat_exp(x.m - m), ky = seat_exp(y.m - m);
  return {m, x.s * kx + y.s * ky, x.a * kx + y.a * ky};
}

// log S of a state. Probabilities are formed as e^{(x - m) - log S}, never e^{x - lse}:
// x - m is exact for nearby values and log S <= log V is small, so p keeps fp32
// precision where lse = m + log S (|m| up to 1e4) would round away digits.
template <typename T>
SEAT_KL_HD T online_log_s(const OnlineLse<T>& st) {
  return seat_log(st.s);
}

// lse_t - lse_o from two states, grouped so identical rows give exactly 0.
template <typename T>
SEAT_KL_HD T lse_difference(const OnlineLse<T>& t, const OnlineLse<T>& o) {
  return (t.m - o.m) + (online_log_s(t) - online_log_s(o));
}

// KL(p_t || p_o) of a row from the target's state (with a) and the other's state.
template <typename T>
SEAT_KL_HD T kl_value(const OnlineLse<T>& target, const OnlineLse<T>& other) {
  return target.a / target.s - lse_difference(target, other);
}

// The exponential the gradient formulas use: libm's by default; the CPU kernel passes a
// branch-free one that its loops can vectorize.
struct StdExp {
  template <typename T>
  SEAT_KL_HD static T exp(T x) { return seat_exp(x); }
};

// d KL(p_ref || p_cur) / d cur_v (times `factor` = scale / T): (p_cur - p_ref).
// c, r are tempered logits (logit / T); m_*, ls_* the rows' max and log S.
template <typename T, typename E = StdExp>
SEAT_KL_HD T kl_forward_grad(T c, T r, T m_c, T ls_c, T m_r, T ls_r, T factor) {
  return (E::exp((c - m_c) - ls_c) - E::exp((r - m_r) - ls_r)) * factor;
}

// d KL(p_cur || p_ref) / d cur_v (times factor): p_cur (log p_cur - log p_ref - KL),
// 0 where p_cur == 0 (-inf logits, or mass below the smallest float); a NaN p_cur (a NaN
// or +inf row) stays NaN. The log-ratio is formed as (c - r) - (lse_c - lse_r) (dlse =
// lse_difference(cur, ref)) so equal logits cancel exactly even at |logit| ~ 1e4.
template <typename T, typename E = StdExp>
SEAT_KL_HD T kl_reverse_grad(T c, T r, T m_c, T ls_c, T dlse, T kl, T factor) {
  const T p = E::exp((c - m_c) - ls_c);
  const T g = p * (((c - r) - dlse) - kl) * factor;
  return p == T(0) ? T(0) : g;  // the reference's where(p_cur == 0, 0, ...); a select: vectorizable
}

// d CE / d x_v (times factor): softmax(x)_v - [v == label].
template <typename T, typename E = StdExp>
SEAT_KL_HD T ce_grad(T x, T m, T ls, bool is_label, T factor) {
  const T p = E::exp((x - m) - ls);
  return (is_label ? p - T(1) : p) * factor;
}

}  // namespace seat
