// AdamW per-element math and bf16 rounding shared by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) kernels; the same steps, in the same order, as python/seat/ops/_adamw.py
// and seat_kernels/adamw_math.py. Plain C++ (no torch headers).
#pragma once
#include <cmath>
#include <cstdint>

#include "seat/common.h"

namespace seat {

// The 7 host scalars of a step, in this order (python/seat/ops/_adamw.py AdamWScalars).
constexpr int kAdamWScalars = 7;

template <typename T>
struct AdamWScalars {
  T decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt;
};

template <typename T>
AdamWScalars<T> adamw_scalars(const double* s) {
  return {static_cast<T>(s[0]), static_cast<T>(s[1]), static_cast<T>(s[2]), static_cast<T>(s[3]),
          static_cast<T>(s[4]), static_cast<T>(s[5]), static_cast<T>(s[6])};
}

SEAT_HD float seat_sqrt(float x) { return sqrtf(x); }
SEAT_HD double seat_sqrt(double x) { return sqrt(x); }

// One AdamW step of one element: updates m, v (and *vmax for amsgrad, when non-null) and
// returns the new weight.
template <typename T>
SEAT_HD T adamw_step(T w, T g, T& m, T& v, T* vmax, const AdamWScalars<T>& s, bool maximize) {
  if (maximize) g = -g;
  w = w * s.decay;
  // exp_avg.lerp_(g, 1 - beta1) as torch computes it, from the nearer end: the same
  // rounding, and the same non-finite results (an inf gradient with a weight >= 0.5 gives
  // NaN in torch: inf - inf). w1 - 1 is exact for w1 in [0.5, 1].
  const bool near_m = s.one_minus_beta1 < T(0.5);
  m = (near_m ? m : g) + (near_m ? s.one_minus_beta1 : s.one_minus_beta1 - T(1)) * (g - m);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  T second = v;
  if (vmax != nullptr) {
    // max, NaN-propagating from either side like torch.maximum
    if (*vmax == *vmax && !(*vmax >= v)) *vmax = v;
    second = *vmax;
  }
  const T denom = seat_sqrt(second) / s.bias_correction2_sqrt + s.eps;
  return w - s.step_size * (m / denom);
}

// Key of the i-th tensor of a call; the element at flat position `pos` gets the random
// bits mix32(tensor_key ^ mix32(pos)).
SEAT_HD uint32_t tensor_key(uint32_t step_key, uint32_t i) { return mix32(step_key ^ mix32(i)); }

SEAT_HD uint32_t float_bits(float x) {
  union { float f; uint32_t u; } c;
  c.f = x;
  return c.u;
}

SEAT_HD float bits_float(uint32_t u) {
  union { float f; uint32_t u; } c;
  c.u = u;
  return c.f;
}

SEAT_HD float bf16_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

// fp32 -> bf16 bits: round to nearest even, or stochastically (add 16 random low bits),
// then drop the low half. NaN stays NaN.
SEAT_HD uint16_t float_to_bf16(float x, bool stochastic, uint32_t random_bits) {
  const uint32_t u = float_bits(x);
  if (x != x) return 0x7FC0u;  // the canonical quiet NaN, as torch rounds it
  const uint32_t increment = stochastic ? (random_bits & 0xFFFFu) : (0x7FFFu + ((u >> 16) & 1u));
  return static_cast<uint16_t>((u + increment) >> 16);
}

// A compact gradient entry as the state type T: the state's own type, or bf16 bits (the
// lean bf16-gradient mode: the gradient is stored in bf16 and upcast exactly on load).
template <typename T>
SEAT_HD T load_grad(const T* g) { return *g; }
template <typename T>
SEAT_HD T load_grad(const uint16_t* g) { return static_cast<T>(bf16_to_float(*g)); }

// One trained entry's AdamW step, shared by CPU and CUDA: the entry at flat position
// `pos` whose compact slot is `i`, as a mask policy's visit() yields them (seat/masks.h).
// ParamIO: the param's storage type and its load/store as the state type T; G: the
// compact gradient's storage, T or uint16_t bf16 bits. State is compact (indexed by i,
// like grad) or, with dense_state, full-size (indexed by the entry's position).
template <typename ParamIO, typename T, typename G = T>
SEAT_HD void sparse_adamw_entry(typename ParamIO::storage* param, int64_t pos, const G* grad, T* exp_avg,
                                T* exp_avg_sq, T* master, T* max_exp_avg_sq, int64_t i, const AdamWScalars<T>& s,
                                bool maximize, bool stochastic, uint32_t key, bool dense_state) {
  const int64_t at = dense_state ? pos : i;
  T w = master != nullptr ? master[at] : ParamIO::template load<T>(param + pos);
  T m = exp_avg[at], v = exp_avg_sq[at];
  w = adamw_step<T>(w, load_grad<T>(grad + i), m, v, max_exp_avg_sq != nullptr ? max_exp_avg_sq + at : nullptr, s, maximize);
  exp_avg[at] = m;
  exp_avg_sq[at] = v;
  if (master != nullptr) master[at] = w;
  const bool round_stochastic = stochastic && master == nullptr;
  ParamIO::store(param + pos, w, round_stochastic,
                 round_stochastic ? mix32(key ^ mix32(static_cast<uint32_t>(pos))) : 0u);
}

// bf16 storage as raw bits: the same code on CPU and GPU.
struct BF16IO {
  using storage = uint16_t;
  template <typename T>
  SEAT_HD static T load(const uint16_t* p) { return static_cast<T>(bf16_to_float(*p)); }
  template <typename T>
  SEAT_HD static void store(uint16_t* p, T w, bool stochastic, uint32_t bits) {
    *p = float_to_bf16(static_cast<float>(w), stochastic, bits);
  }
};

// fp32 / fp64 storage: no rounding beyond the state type's own.
template <typename P>
struct PlainIO {
  using storage = P;
  template <typename T>
  SEAT_HD static T load(const P* p) { return static_cast<T>(*p); }
  template <typename T>
  SEAT_HD static void store(P* p, T w, bool, uint32_t) { *p = static_cast<P>(w); }
};

}  // namespace seat
