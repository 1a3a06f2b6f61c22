// The AdamW math of sparse_update.cpp's adamw_lanes on W float lanes (GCC vector types).
// sparse_update.cpp includes this file once per instruction set, inside a namespace, with
// the lane count W in the macro SEAT_VEC_W (16: AVX-512, 8: AVX2), under
// `#pragma GCC target(...)` and fp-contract=off: the same operations in the same order as
// seat::adamw_step, each rounded on its own, so every copy gives the scalar copy's bits.
// No include guard (deliberately): included once per target namespace.

#include "vec.h"

inline fv vsqrt(fv x) {  // IEEE square root, correctly rounded on every lane
#if SEAT_VEC_W == 16
  return reinterpret_cast<fv>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#else
  return reinterpret_cast<fv>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#endif
}

void adamw_lanes(float* w, const float* g, float* m, float* v, float* vmax, int64_t n,
                 const seat::AdamWScalars<float>& s, bool maximize) {
  const fv decay = splat(s.decay), beta2 = splat(s.beta2), omb2 = splat(s.one_minus_beta2), eps = splat(s.eps);
  const fv step_size = splat(s.step_size), bc2 = splat(s.bias_correction2_sqrt);
  // the lerp from the nearer end (seat::adamw_step): m + t (g - m), or g + (t - 1) (g - m)
  const bool near_m = s.one_minus_beta1 < 0.5f;
  const fv t = splat(near_m ? s.one_minus_beta1 : s.one_minus_beta1 - 1.0f);
  const iv sign = reinterpret_cast<iv>(splat(maximize ? -0.0f : 0.0f));
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    const fv gk = reinterpret_cast<fv>(reinterpret_cast<iv>(load(g + k)) ^ sign);
    const fv mk = load(m + k);
    const fv wk = load(w + k) * decay;
    const fv mn = (near_m ? mk : gk) + t * (gk - mk);
    const fv vk = load(v + k) * beta2 + (omb2 * gk) * gk;
    fv second = vk;
    if (vmax != nullptr) {
      const fv old = load(vmax + k);
      // not NaN and !(old >= v): v (torch.maximum propagates NaN from either side)
      second = (old == old) & ~(old >= vk) ? vk : old;
      store(vmax + k, second);
    }
    const fv denom = vsqrt(second) / bc2 + eps;
    store(w + k, wk - step_size * (mn / denom));
    store(m + k, mn);
    store(v + k, vk);
  }
  adamw_lanes_scalar<float>(w + k, g + k, m + k, v + k, vmax != nullptr ? vmax + k : nullptr, n - k, s, maximize);
}
