// W-lane float vectors (GCC vector types) for the CPU kernels' per-instruction-set copies:
// the types, a broadcast, and float loads and stores. Included (by kl_div_vec.h and
// adamw_vec.h) inside a namespace per instruction set, with the lane count in the macro
// SEAT_VEC_W and under that set's `#pragma GCC target(...)`, so each copy lowers these to
// its own vector registers.
// No include guard (deliberately): included once per target namespace.

constexpr int W = SEAT_VEC_W;
typedef float fv __attribute__((vector_size(4 * W)));
typedef int32_t iv __attribute__((vector_size(4 * W)));
typedef uint32_t uv __attribute__((vector_size(4 * W)));
typedef uint16_t hv __attribute__((vector_size(2 * W)));

inline __attribute__((always_inline)) fv splat(float x) {  // a broadcast (fv{} + x would make -0.0 +0.0)
  fv v;
  for (int l = 0; l < W; ++l) v[l] = x;
  return v;
}
inline __attribute__((always_inline)) fv load(const float* p) {
  fv v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void store(float* p, fv v) { std::memcpy(p, &v, sizeof(v)); }
