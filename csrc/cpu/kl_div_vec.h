// The tile loops of the CPU loss kernel (csrc/cpu/kl_div.cpp) in W-lane GCC vector-extension
// code, reading and writing the tensors' own dtype (float, bfloat16, float16: converted in
// registers). kl_div.cpp includes this file once per instruction set, inside a namespace,
// with the lane count W in the macro SEAT_VEC_W and under `#pragma GCC target(...)`, so
// every helper here is compiled for that set (a helper compiled for another set and
// inlined later keeps that set's lowering): baseline x86-64 / any GNU target W = 4 (SSE2,
// NEON), AVX2 W = 8, AVX-512 W = 16. SEAT_VEC_F16C says whether the set converts float16
// in hardware (F16C / AVX-512F); otherwise float16 goes through c10::Half lane by lane.
//
// Element for element these compute what the double loops of kl_div.cpp compute (the same
// formulas of seat/kl_div.h), in float with a branch-free exp (vexp): sums run in float
// vector lanes within a tile (at most kTile / W terms per lane) and are added to the
// row's double lanes (LaneSums) at the end of each tile, so a row's sums carry the
// rounding of one tile's float lanes, not of the whole row.
// No include guard (deliberately): included once per target namespace.

#include "vec.h"

SEAT_ALWAYS_INLINE fv load(const c10::BFloat16* p) {  // exact: bf16 is float's high half
  hv h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<fv>(__builtin_convertvector(h, uv) << 16);
}
SEAT_ALWAYS_INLINE fv load(const c10::Half* p) {  // exact
#if SEAT_VEC_F16C && SEAT_VEC_W == 8
  return reinterpret_cast<fv>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif SEAT_VEC_F16C && SEAT_VEC_W == 16
  return reinterpret_cast<fv>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  fv v;
  for (int l = 0; l < W; ++l) v[l] = static_cast<float>(p[l]);
  return v;
#endif
}

// Round to nearest even, NaN -> 0x7FC0: c10::BFloat16(float) bit for bit.
SEAT_ALWAYS_INLINE void store(c10::BFloat16* p, fv v) {
  const uv u = reinterpret_cast<uv>(v);
  const uv rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const uv bits = v != v ? uv{} + 0x7FC0u : rounded;
  const hv h = __builtin_convertvector(bits, hv);
  std::memcpy(p, &h, sizeof(h));
}
SEAT_ALWAYS_INLINE void store(c10::Half* p, fv v) {  // round to nearest even, as c10::Half(float)
#if SEAT_VEC_F16C && SEAT_VEC_W == 8
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif SEAT_VEC_F16C && SEAT_VEC_W == 16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int l = 0; l < W; ++l) p[l] = c10::Half(v[l]);
#endif
}

// The first `count` (< W) elements; the other lanes -inf (no mass: e = 0, no weight).
template <typename T>
SEAT_ALWAYS_INLINE fv load_part(const T* p, int count) {
  alignas(64) T buf[W];
  for (int l = 0; l < W; ++l) buf[l] = l < count ? p[l] : T(seat::neg_inf<float>());
  return load(buf);
}
template <typename T>
SEAT_ALWAYS_INLINE void store_part(T* p, fv v, int count) {
  alignas(64) T buf[W];
  store(buf, v);
  for (int l = 0; l < count; ++l) p[l] = buf[l];
}

// e^x for x <= 0 (every argument here is x - running max or x - log S) on W floats:
// Cephes' expf polynomial, ~1 ulp, selects instead of branches. Below -87.3 it returns 0
// where expf would return a denormal (< 1.2e-38); -inf gives 0, NaN stays NaN.
SEAT_ALWAYS_INLINE fv vexp(fv x) {
  const fv low = splat(-87.33654f), zero = splat(0.f);
  const fv xc = x < low ? low : (x > zero ? zero : x);
  const iv n = __builtin_convertvector(xc * 1.44269504088896341f + 128.5f, iv) - 128;
  const fv fn = __builtin_convertvector(n, fv);
  const fv r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  fv p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const fv scale = reinterpret_cast<fv>((n + 127) << 23);
  const fv out = x < low ? zero : p * scale;
  return x != x ? x : out;
}

SEAT_ALWAYS_INLINE fv vnan_max(fv m, fv x) { return ((x > m) | (x != x)) ? x : m; }

SEAT_ALWAYS_INLINE float lanes_max(fv m) {
  float out = seat::neg_inf<float>();
  for (int l = 0; l < W; ++l) out = nan_max(out, m[l]);
  return out;
}

// Add float lanes to the row's double lanes (lane l to lane l % kLanes).
SEAT_ALWAYS_INLINE void flush(fv v, double* lanes) {
  for (int l = 0; l < W; ++l) lanes[l % kLanes] += static_cast<double>(v[l]);
}

// Walk n elements W at a time (two vectors per step for independent chains), then the
// remainder: f(j) on whole vectors at j, tail(j, count) on the last partial one.
template <typename F, typename Tail>
SEAT_ALWAYS_INLINE void for_vectors(int n, F&& f2, Tail&& tail) {
  int j = 0;
  for (; j + 2 * W <= n; j += 2 * W) f2(j, true);
  if (j + W <= n) {
    f2(j, false);
    j += W;
  }
  if (j < n) tail(j, n - j);
}

// The unscaled maxima of n elements of c and r (NaN once one is seen).
template <typename TC, typename TR>
void pair_max(const TC* c, const TR* r, int n, float* mc, float* mr) {
  fv c0 = splat(seat::neg_inf<float>()), c1 = c0, r0 = c0, r1 = c0;
  for_vectors(
      n,
      [&](int j, bool two) {
        c0 = vnan_max(c0, load(c + j));
        r0 = vnan_max(r0, load(r + j));
        if (two) {
          c1 = vnan_max(c1, load(c + j + W));
          r1 = vnan_max(r1, load(r + j + W));
        }
      },
      [&](int j, int count) {
        c1 = vnan_max(c1, load_part(c + j, count));
        r1 = vnan_max(r1, load_part(r + j, count));
      });
  *mc = lanes_max(vnan_max(c0, c1));
  *mr = lanes_max(vnan_max(r0, r1));
}

template <typename T>
float row_max(const T* x, int n) {
  fv m0 = splat(seat::neg_inf<float>()), m1 = m0;
  for_vectors(
      n,
      [&](int j, bool two) {
        m0 = vnan_max(m0, load(x + j));
        if (two) m1 = vnan_max(m1, load(x + j + W));
      },
      [&](int j, int count) { m1 = vnan_max(m1, load_part(x + j, count)); });
  return lanes_max(vnan_max(m0, m1));
}

// One tile of a KL row: s += e^{x*scale - m} for both inputs and, for the target (cur if
// target_is_cur, else ref), a += e (t - o) where e > 0 (no mass: no weight).
template <bool kTargetIsCur, typename TC, typename TR>
SEAT_ALWAYS_INLINE void pair_sums_impl(const TC* c, const TR* r, int n, float scale, float mc, float mr,
                                       LaneSums& cs, LaneSums& rs) {
  const fv zero = splat(0.f);
  fv sc[2] = {zero, zero}, sr[2] = {zero, zero}, a[2] = {zero, zero};
  auto add = [&](fv cv, fv rv, int k) {
    const fv ec = vexp(cv - mc), er = vexp(rv - mr);
    sc[k] += ec;
    sr[k] += er;
    if constexpr (kTargetIsCur) {
      a[k] += ec > zero ? ec * (cv - rv) : zero;
    } else {
      a[k] += er > zero ? er * (rv - cv) : zero;
    }
  };
  for_vectors(
      n,
      [&](int j, bool two) {
        add(load(c + j) * scale, load(r + j) * scale, 0);
        if (two) add(load(c + j + W) * scale, load(r + j + W) * scale, 1);
      },
      [&](int j, int count) { add(load_part(c + j, count) * scale, load_part(r + j, count) * scale, 1); });
  flush(sc[0] + sc[1], cs.s);
  flush(sr[0] + sr[1], rs.s);
  flush(a[0] + a[1], kTargetIsCur ? cs.a : rs.a);
}

template <typename TC, typename TR>
void pair_sums(const TC* c, const TR* r, int n, float scale, float mc, float mr, bool target_is_cur, LaneSums& cs,
               LaneSums& rs) {
  if (target_is_cur) {
    pair_sums_impl<true>(c, r, n, scale, mc, mr, cs, rs);
  } else {
    pair_sums_impl<false>(c, r, n, scale, mc, mr, cs, rs);
  }
}

// One tile of a CE row: s += e^{x - m}.
template <typename T>
void row_sums(const T* x, int n, float m, LaneSums& acc) {
  const fv zero = splat(0.f);
  fv s[2] = {zero, zero};
  for_vectors(
      n,
      [&](int j, bool two) {
        s[0] += vexp(load(x + j) - m);
        if (two) s[1] += vexp(load(x + j + W) - m);
      },
      [&](int j, int count) { s[1] += vexp(load_part(x + j, count) - m); });
  flush(s[0] + s[1], acc.s);
}

template <typename TC, typename TR>
void kl_grad(const TC* c, const TR* r, int n, float scale, const GradConsts<float>& k, bool reverse, TC* g) {
  const fv zero = splat(0.f);
  auto grad = [&](fv cv, fv rv) {
    if (reverse) {
      const fv p = vexp((cv - k.m_c) - k.ls_c);
      const fv gv = p * (((cv - rv) - k.dlse) - k.kl) * k.factor;
      return p == zero ? zero : gv;
    }
    return (vexp((cv - k.m_c) - k.ls_c) - vexp((rv - k.m_r) - k.ls_r)) * k.factor;
  };
  for_vectors(
      n,
      [&](int j, bool two) {
        store(g + j, grad(load(c + j) * scale, load(r + j) * scale));
        if (two) store(g + j + W, grad(load(c + j + W) * scale, load(r + j + W) * scale));
      },
      [&](int j, int count) {
        store_part(g + j, grad(load_part(c + j, count) * scale, load_part(r + j, count) * scale), count);
      });
}

template <typename T>
void ce_grad(const T* x, int n, int64_t label_in_tile, float m, float ls, float factor, T* g) {
  const int32_t label = label_in_tile >= 0 && label_in_tile < n ? static_cast<int32_t>(label_in_tile) : -1;
  iv iota;
  for (int l = 0; l < W; ++l) iota[l] = l;
  auto grad = [&](fv xv, int j) {
    const fv p = vexp((xv - m) - ls);
    return (p - ((iota + j) == label ? splat(1.f) : splat(0.f))) * factor;
  };
  for_vectors(
      n,
      [&](int j, bool two) {
        store(g + j, grad(load(x + j), j));
        if (two) store(g + j + W, grad(load(x + j + W), j + W));
      },
      [&](int j, int count) { store_part(g + j, grad(load_part(x + j, count), j), count); });
}

template <typename TC, typename TR>
FloatTiles<TC, TR> make_tiles() {
  return {pair_max<TC, TR>, pair_sums<TC, TR>, kl_grad<TC, TR>, row_max<TC>, row_sums<TC>, ce_grad<TC>};
}
