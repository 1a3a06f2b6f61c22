// The float tile loops of the CPU loss kernel (csrc/cpu/kl_div.cpp) for AVX2 and AVX-512,
// in 8-wide GCC vector-extension code. kl_div.cpp includes this file once per instruction
// set, inside a namespace and under `#pragma GCC target(...)`, so every helper here (not
// only the entry points) is compiled for that set: a helper compiled for baseline x86-64
// and inlined later keeps its SSE2 lowering. (The baseline copy uses the scalar templates,
// which GCC vectorizes for SSE2 better than it lowers these 256-bit types.)
//
// Element for element these compute what the scalar templates of kl_div.cpp compute (the
// same exp polynomial, selects and lane layout: lanes 0-7 and 8-15 of a 16-element group
// are the two halves), so the double templates stay the oracle-checked definition and the
// float rows differ from them by rounding only.
// No include guard (deliberately): included once per target namespace.

SEAT_ALWAYS_INLINE f8 splat8(float v) { return f8{v, v, v, v, v, v, v, v}; }
SEAT_ALWAYS_INLINE d4 splat4(double v) { return d4{v, v, v, v}; }
SEAT_ALWAYS_INLINE f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SEAT_ALWAYS_INLINE void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
// The low / high 4 floats as doubles (GCC 12 lowers __builtin_convertvector(v4sf -> v4df)
// to 2-float conversions through the stack, even for AVX).
SEAT_ALWAYS_INLINE d4 low4(f8 v) {
  return reinterpret_cast<d4>(_mm256_cvtps_pd(_mm256_castps256_ps128(reinterpret_cast<__m256>(v))));
}
SEAT_ALWAYS_INLINE d4 high4(f8 v) {
  return reinterpret_cast<d4>(_mm256_cvtps_pd(_mm256_extractf128_ps(reinterpret_cast<__m256>(v), 1)));
}

// FastExp::exp on 8 floats.
SEAT_ALWAYS_INLINE f8 exp8(f8 x) {
  const f8 low = splat8(-87.33654f), zero = splat8(0.f);
  const f8 xc = x < low ? low : (x > zero ? zero : x);
  const i8 n = __builtin_convertvector(xc * 1.44269504088896341f + 128.5f, i8) - 128;
  const f8 fn = __builtin_convertvector(n, f8);
  const f8 r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  f8 p = splat8(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const f8 scale = reinterpret_cast<f8>((n + 127) << 23);
  const f8 out = x < low ? zero : p * scale;
  return x != x ? x : out;
}

SEAT_ALWAYS_INLINE f8 nan_max8(f8 m, f8 x) { return ((x > m) | (x != x)) ? x : m; }

float tile_max8(const float* x, int n) {
  f8 m0 = splat8(seat::neg_inf<float>()), m1 = m0;
  for (int j = 0; j < n; j += kLanes) {
    m0 = nan_max8(m0, load8(x + j));
    m1 = nan_max8(m1, load8(x + j + 8));
  }
  float m = seat::neg_inf<float>();
  for (int l = 0; l < 8; ++l) m = nan_max(nan_max(m, m0[l]), m1[l]);
  return m;
}

void tile_sums8(const float* x, const float* o, int n, float m, LaneSums& acc) {
  d4 s[4], a[4];
  std::memcpy(s, acc.s, sizeof(s));
  std::memcpy(a, acc.a, sizeof(a));
  const d4 zero = splat4(0.0);
  for (int j = 0; j < n; j += kLanes) {
    for (int h = 0; h < 2; ++h) {
      const f8 xv = load8(x + j + 8 * h), ov = load8(o + j + 8 * h);
      const f8 e = exp8(xv - m);
      const d4 e_lo = low4(e), e_hi = high4(e);
      s[2 * h] += e_lo;
      s[2 * h + 1] += e_hi;
      a[2 * h] += e_lo > zero ? e_lo * (low4(xv) - low4(ov)) : zero;  // no mass: no weight
      a[2 * h + 1] += e_hi > zero ? e_hi * (high4(xv) - high4(ov)) : zero;
    }
  }
  std::memcpy(acc.s, s, sizeof(s));
  std::memcpy(acc.a, a, sizeof(a));
}

void tile_kl_grad8(const float* c, const float* r, int n, const GradConsts<float>& k, bool reverse, float* g) {
  if (reverse) {
    for (int j = 0; j < n; j += 8) {
      const f8 cv = load8(c + j), rv = load8(r + j);
      const f8 p = exp8((cv - k.m_c) - k.ls_c);
      const f8 gv = p * (((cv - rv) - k.dlse) - k.kl) * k.factor;
      store8(g + j, p == splat8(0.f) ? splat8(0.f) : gv);
    }
  } else {
    for (int j = 0; j < n; j += 8) {
      const f8 cv = load8(c + j), rv = load8(r + j);
      store8(g + j, (exp8((cv - k.m_c) - k.ls_c) - exp8((rv - k.m_r) - k.ls_r)) * k.factor);
    }
  }
}

void tile_ce_grad8(const float* x, int n, int64_t label_in_tile, float m, float ls, float factor, float* g) {
  const int32_t label = label_in_tile >= 0 && label_in_tile < n ? static_cast<int32_t>(label_in_tile) : -1;
  const i8 iota{0, 1, 2, 3, 4, 5, 6, 7};
  for (int j = 0; j < n; j += 8) {
    const f8 p = exp8((load8(x + j) - m) - ls);
    const f8 one_at_label = (iota + j) == label ? splat8(1.f) : splat8(0.f);
    store8(g + j, (p - one_at_label) * factor);
  }
}

TileKernels make_kernels() { return {tile_max8, tile_sums8, tile_kl_grad8, tile_ce_grad8}; }
