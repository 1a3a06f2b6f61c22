// CPU kernel of the fused log-softmax losses (seat_C::paired_rows, used by kl_div,
// paired_loss and fused_linear_paired_loss): rows in parallel (at::parallel_for, i.e.
// OpenMP), each row read twice.
//   pass 1: online log-softmax of both inputs at once, tile by tile: the tile's max,
//           then e^{x - m} (and the KL weights) added to kLanes double partial sums in a
//           vectorized loop (LaneSums) -> the row's loss, formed in double;
//   pass 2: the gradient w.r.t. the row's logits, written straight into the output.
// Tiles are converted to the accumulation type in small stack buffers (L1-resident), so
// no N x V temporary exists besides the gradient. float rows use a branch-free exp and
// are compiled for AVX-512 / AVX2 / baseline x86-64 (picked at first use from the
// CPU's features, tile_kernels); double rows (the oracle tests) use libm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// The tile loops are full of selects on floats (x == -inf, e > 0, the exp's range
// clamp); under GCC's default -ftrapping-math it will not turn them into vector blends,
// and the loops stay scalar. Values are unchanged (no exceptions are observed here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
#include "isa.h"
#include "seat/kl_div.h"

namespace {

constexpr int kTile = 1024;  // 2-4 tile buffers of 4 KiB (float) stay in L1
constexpr int kLanes = 16;   // independent partial sums per row (tiles are padded to a multiple)
static_assert(kTile % kLanes == 0, "tiles hold whole lane groups");

// The tile helpers are compiled into each target_clones variant only if inlined there.
#define SEAT_ALWAYS_INLINE inline __attribute__((always_inline))

// exp for x <= 0 (every argument here is x - running max or x - lse): Cephes' expf
// polynomial, ~1 ulp, selects instead of branches so the tile loops vectorize. Below
// -87.3 it returns 0 where expf would return a denormal (< 1.2e-38); -inf gives 0, NaN
// stays NaN.
struct FastExp {
  static SEAT_ALWAYS_INLINE float exp(float x) {
    constexpr float kLow = -87.33654f;
    const float xc = x < kLow ? kLow : (x > 0.f ? 0.f : x);
    // n = round(xc / ln 2) in [-126, 0]: truncating a positive number (+128) is a floor
    // that vectorizes on every x86 level (floorf needs SSE4.1, and a compare-and-fix
    // floor keeps GCC from vectorizing at all).
    const int n = static_cast<int>(xc * 1.44269504088896341f + 128.5f) - 128;
    const float fn = static_cast<float>(n);
    const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const float out = x < kLow ? 0.f : p * scale;
    return x != x ? x : out;
  }
  static SEAT_ALWAYS_INLINE double exp(double x) { return std::exp(x); }
};

// max that keeps a NaN once seen (a NaN logit makes the whole row NaN, as in torch).
template <typename A>
SEAT_ALWAYS_INLINE A nan_max(A m, A x) {
  return (x > m || x != x) ? x : m;
}

// The sums of a row's online log-softmax, kept in kLanes partial sums in double whatever
// the input dtype: s = sum e^{x - m}, a = sum_{e > 0} e^{x - m} (x - o). Lane l adds
// elements l, l + kLanes, ... (independent accumulators: the loop vectorizes without
// reassociation), a float term enters its double lane exactly, and the lanes are merged
// pairwise at the end: the row sums carry no summation error a float loss could show,
// so the losses are as accurate as torch's (cascade-summed) float ones or better.
struct LaneSums {
  alignas(64) double s[kLanes];
  alignas(64) double a[kLanes];
};

// Pairwise (tree) sum of the kLanes partial sums.
SEAT_ALWAYS_INLINE double lane_total(const double* v) {
  double t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = v[l];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  }
  return t[0];
}

template <typename A>
SEAT_ALWAYS_INLINE A tile_max_impl(const A* x, int n) {
  A lane_m[kLanes];
  for (int l = 0; l < kLanes; ++l) lane_m[l] = seat::neg_inf<A>();
  for (int j = 0; j < n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane_m[l] = nan_max(lane_m[l], x[j + l]);
  }
  A m = seat::neg_inf<A>();
  for (int l = 0; l < kLanes; ++l) m = nan_max(m, lane_m[l]);
  return m;
}

// Add e^{x - m} and the KL weights e^{x - m} (x - o) of a tile (n a multiple of kLanes)
// to the lanes. The same loop serves the target and the other input of a KL row, so
// identical inputs give identical sums (and a = 0 exactly).
template <typename A>
SEAT_ALWAYS_INLINE void tile_sums_impl(const A* x, const A* o, int n, A m, LaneSums& acc) {
  for (int j = 0; j < n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const A e = FastExp::exp(x[j + l] - m);
      const double w = static_cast<double>(x[j + l]) - static_cast<double>(o[j + l]);
      acc.s[l] += static_cast<double>(e);
      acc.a[l] += e > A(0) ? static_cast<double>(e) * w : 0.0;  // no mass (-inf, underflow): no weight
    }
  }
}

// Row constants of the gradient pass.
template <typename A>
struct GradConsts {
  A m_c, ls_c, m_r, ls_r, dlse, kl, factor;
};

template <typename A>
SEAT_ALWAYS_INLINE void tile_kl_grad_impl(const A* c, const A* r, int n, const GradConsts<A>& k, bool reverse, A* g) {
  if (reverse) {
    for (int j = 0; j < n; ++j) g[j] = seat::kl_reverse_grad<A, FastExp>(c[j], r[j], k.m_c, k.ls_c, k.dlse, k.kl, k.factor);
  } else {
    for (int j = 0; j < n; ++j) g[j] = seat::kl_forward_grad<A, FastExp>(c[j], r[j], k.m_c, k.ls_c, k.m_r, k.ls_r, k.factor);
  }
}

template <typename A>
SEAT_ALWAYS_INLINE void tile_ce_grad_impl(const A* x, int n, int64_t label_in_tile, A m, A ls, A factor, A* g) {
  for (int j = 0; j < n; ++j) g[j] = seat::ce_grad<A, FastExp>(x[j], m, ls, j == label_in_tile, factor);
}

// 8 floats, 8 int32, 4 doubles: the vector types of the float tile loops (kl_div_tiles.h).
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));

// The float tile loops (kl_div_tiles.h), compiled once per instruction set and picked
// at first use from what the CPU reports (__builtin_cpu_supports). GCC's
// target_clones("arch=...") picks by CPU model, and so ran the baseline SSE2 copy on
// every AMD CPU. Other compilers get the baseline copy only.
struct TileKernels {
  float (*max)(const float*, int);
  void (*sums)(const float*, const float*, int, float, LaneSums&);
  void (*kl_grad)(const float*, const float*, int, const GradConsts<float>&, bool, float*);
  void (*ce_grad)(const float*, int, int64_t, float, float, float, float*);
};

namespace baseline {
TileKernels make_kernels() {
  return {tile_max_impl<float>, tile_sums_impl<float>, tile_kl_grad_impl<float>, tile_ce_grad_impl<float>};
}
}  // namespace baseline
#ifdef SEAT_CPU_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kl_div_tiles.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
#include "kl_div_tiles.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The copy seat::cpu::cpu_isa() picks (this CPU's best, or SEAT_CPU_ISA's).
const TileKernels& tile_kernels() {
  static const TileKernels chosen = [] {
#ifdef SEAT_CPU_ISA_COPIES
    switch (seat::cpu::cpu_isa()) {
      case seat::cpu::Isa::kAvx512: return avx512::make_kernels();
      case seat::cpu::Isa::kAvx2: return avx2::make_kernels();
      case seat::cpu::Isa::kBaseline: break;
    }
#endif
    return baseline::make_kernels();
  }();
  return chosen;
}

inline float tile_max(const float* x, int n) { return tile_kernels().max(x, n); }
inline double tile_max(const double* x, int n) { return tile_max_impl<double>(x, n); }
inline void tile_sums(const float* x, const float* o, int n, float m, LaneSums& acc) { tile_kernels().sums(x, o, n, m, acc); }
inline void tile_sums(const double* x, const double* o, int n, double m, LaneSums& acc) {
  tile_sums_impl<double>(x, o, n, m, acc);
}
inline void tile_kl_grad(const float* c, const float* r, int n, const GradConsts<float>& k, bool reverse, float* g) {
  tile_kernels().kl_grad(c, r, n, k, reverse, g);
}
inline void tile_kl_grad(const double* c, const double* r, int n, const GradConsts<double>& k, bool reverse,
                         double* g) {
  tile_kl_grad_impl<double>(c, r, n, k, reverse, g);
}
inline void tile_ce_grad(const float* x, int n, int64_t label, float m, float ls, float factor, float* g) {
  tile_kernels().ce_grad(x, n, label, m, ls, factor, g);
}
inline void tile_ce_grad(const double* x, int n, int64_t label, double m, double ls, double factor, double* g) {
  tile_ce_grad_impl<double>(x, n, label, m, ls, factor, g);
}

// A row's running state: the max so far (NaN once a NaN is seen) and the lane sums
// relative to it.
template <typename A>
struct RowSums {
  A m = seat::neg_inf<A>();
  LaneSums lanes{};
};

// Add one tile (x, with KL weights against o; n a multiple of kLanes) to a running state.
template <typename A>
inline void tile_accumulate(RowSums<A>& st, const A* x, const A* o, int n) {
  const A m = nan_max(st.m, tile_max(x, n));
  if (m == seat::neg_inf<A>()) return;  // only -inf so far: nothing to add
  if (!(m == st.m)) {  // a new max: rescale what was summed (k = 0 on the first finite tile)
    const double k = std::exp(static_cast<double>(st.m) - static_cast<double>(m));
    for (int l = 0; l < kLanes; ++l) {
      st.lanes.s[l] *= k;
      st.lanes.a[l] *= k;
    }
  }
  tile_sums(x, o, n, m, st.lanes);
  st.m = m;
}

// The row's (max, sum, weighted sum) in double, for the loss formulas of seat/kl_div.h.
template <typename A>
inline seat::OnlineLse<double> row_state(const RowSums<A>& st) {
  return {static_cast<double>(st.m), lane_total(st.lanes.s), lane_total(st.lanes.a)};
}

// Storage -> accumulation type (bf16 / fp16 through float, exactly).
template <typename A, typename T>
inline A to_acc(T v) {
  return static_cast<A>(static_cast<float>(v));
}
template <>
inline double to_acc<double, double>(double v) {
  return v;
}

// Convert n values (times scale) into dst and pad it with -inf up to a multiple of
// kLanes (padding has no mass: e = 0, no weight).
template <typename T, typename A>
inline int load_tile(const T* src, int n, A scale, A* dst) {
  for (int j = 0; j < n; ++j) dst[j] = to_acc<A>(src[j]) * scale;
  const int padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int j = n; j < padded; ++j) dst[j] = seat::neg_inf<A>();
  return padded;
}

// The tile the loops read: src itself where it already is what load_tile would make
// (the accumulation type, scale 1, whole lane groups), else its converted copy in buf.
// Skipping the copy saves a store and a load per element on float32 rows.
template <typename T, typename A>
inline const A* tile_input(const T* src, int n, A scale, A* buf, int* padded) {
  if constexpr (std::is_same_v<T, A>) {
    if (scale == A(1) && n % kLanes == 0) {
      *padded = n;
      return src;
    }
  }
  *padded = load_tile(src, n, scale, buf);
  return buf;
}

template <typename T, typename A>
inline void store_tile(const A* src, int n, T* dst) {
  for (int j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// Where a tile's gradient is written: straight into the output where it has the
// accumulation type and the tile is whole lane groups, else into buf (then store_tile).
template <typename T, typename A>
inline A* tile_output(T* dst, int n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    if (n % kLanes == 0) return dst;
  }
  return buf;
}

template <typename T, typename A>
inline void finish_tile(const A* out, int n, A* buf, T* dst) {
  if (out == buf) store_tile(buf, n, dst);
}

template <typename TC>
void zero_row(TC* grad, int64_t vocab) {
  if (grad != nullptr) std::fill(grad, grad + vocab, static_cast<TC>(0.f));
}

// KL(p_ref || p_cur) (reverse: KL(p_cur || p_ref)) of one row, and its gradient (times
// factor) into grad when given. The loss is formed in double from the double row sums.
template <typename TC, typename TR, typename A>
A kl_row(const TC* cur, const TR* ref, int64_t vocab, A inv_t, A factor, bool reverse, TC* grad) {
  alignas(64) A cbuf[kTile];
  alignas(64) A rbuf[kTile];
  RowSums<A> cur_sums, ref_sums;
  int padded = 0;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, vocab - v0));
    const A* c = tile_input(cur + v0, n, inv_t, cbuf, &padded);
    const A* r = tile_input(ref + v0, n, inv_t, rbuf, &padded);
    tile_accumulate(cur_sums, c, r, padded);
    tile_accumulate(ref_sums, r, c, padded);
  }
  const seat::OnlineLse<double> sc = row_state(cur_sums), sr = row_state(ref_sums);
  const double kl = reverse ? seat::kl_value(sc, sr) : seat::kl_value(sr, sc);
  if (grad != nullptr) {
    const GradConsts<A> k{cur_sums.m, static_cast<A>(seat::online_log_s(sc)), ref_sums.m,
                          static_cast<A>(seat::online_log_s(sr)), static_cast<A>(seat::lse_difference(sc, sr)),
                          static_cast<A>(kl), factor};
    alignas(64) A gbuf[kTile];
    for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
      const int n = static_cast<int>(std::min<int64_t>(kTile, vocab - v0));
      const A* c = tile_input(cur + v0, n, inv_t, cbuf, &padded);
      const A* r = tile_input(ref + v0, n, inv_t, rbuf, &padded);
      A* g = tile_output(grad + v0, n, gbuf);
      tile_kl_grad(c, r, padded, k, reverse, g);
      finish_tile(g, n, gbuf, grad + v0);
    }
  }
  return static_cast<A>(kl);
}

// Cross-entropy of one row against `label`, and its gradient (times factor) when asked.
template <typename TC, typename A>
A ce_row(const TC* x, int64_t vocab, int64_t label, A factor, TC* grad) {
  alignas(64) A xbuf[kTile];
  RowSums<A> sums;
  int padded = 0;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, vocab - v0));
    const A* t = tile_input(x + v0, n, A(1), xbuf, &padded);
    tile_accumulate(sums, t, t, padded);
  }
  const seat::OnlineLse<double> st = row_state(sums);
  const double ls = seat::online_log_s(st);
  if (grad != nullptr) {
    alignas(64) A gbuf[kTile];
    for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
      const int n = static_cast<int>(std::min<int64_t>(kTile, vocab - v0));
      const A* t = tile_input(x + v0, n, A(1), xbuf, &padded);
      A* g = tile_output(grad + v0, n, gbuf);
      tile_ce_grad(t, padded, label - v0, sums.m, static_cast<A>(ls), factor, g);
      finish_tile(g, n, gbuf, grad + v0);
    }
  }
  return static_cast<A>((st.m - static_cast<double>(to_acc<A>(x[label]))) + ls);
}

template <typename TC, typename TR, typename A>
void paired_rows_typed(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref,
                       const at::Tensor& kl_valid, const at::Tensor& scales, double temperature, int64_t ignore_index,
                       bool reverse, at::Tensor& per_row, at::Tensor& grad) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), n_ce = labels.numel();
  const TC* x = static_cast<const TC*>(logits.data_ptr());
  const TR* r = static_cast<const TR*>(ref.data_ptr());
  const int64_t* lab = labels.data_ptr<int64_t>();
  const bool* valid = kl_valid.numel() > 0 ? kl_valid.data_ptr<bool>() : nullptr;
  const A ce_factor = scales.data_ptr<A>()[0], kl_factor = scales.data_ptr<A>()[1];
  const A inv_t = static_cast<A>(1.0 / temperature);
  A* out = per_row.data_ptr<A>();
  TC* g = grad.numel() > 0 ? static_cast<TC*>(grad.data_ptr()) : nullptr;
  auto ce = [&](int64_t i) {
    TC* grow = g != nullptr ? g + i * vocab : nullptr;
    const int64_t label = lab[i];
    if (label == ignore_index) {  // ignored x row: no loss, no gradient
      out[i] = A(0);
      zero_row(grow, vocab);
    } else {
      out[i] = ce_row<TC, A>(x + i * vocab, vocab, label, ce_factor, grow);
    }
  };
  auto kl = [&](int64_t k) {
    const int64_t i = n_ce + k;
    TC* grow = g != nullptr ? g + i * vocab : nullptr;
    if (valid != nullptr && !valid[k]) {  // masked x~ row
      out[i] = A(0);
      zero_row(grow, vocab);
    } else {
      out[i] = kl_row<TC, TR, A>(x + i * vocab, r + k * vocab, vocab, inv_t, kl_factor, reverse, grow);
    }
  };
  // Rows are independent. Work item j is CE row j and KL row j (where they exist): a KL
  // row reads two inputs, a CE row one, and contiguous ranges of rows would give one
  // thread the x rows and another the x~ rows. A few items per task when rows are short.
  const int64_t n_kl = n_rows - n_ce;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, std::max(n_ce, n_kl), grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (j < n_ce) ce(j);
      if (j < n_kl) kl(j);
    }
  });
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_half_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kHalf: return f(Tag<c10::Half>{});
    case at::kBFloat16: return f(Tag<c10::BFloat16>{});
    default: TORCH_CHECK(false, "paired_rows CPU kernel: ", name, " has unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> paired_rows_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                   const at::Tensor& ref_logits, const at::Tensor& kl_valid,
                                                   const at::Tensor& scales, double temperature, int64_t ignore_index,
                                                   bool reverse, bool compute_grad) {
  // The public ops validated everything; these checks guard direct calls of the kernel.
  TORCH_CHECK(logits.dim() == 2 && ref_logits.dim() == 2 && logits.is_contiguous() && ref_logits.is_contiguous(),
              "paired_rows CPU kernel: logits and ref_logits must be contiguous 2-D");
  TORCH_CHECK(ref_logits.size(1) == logits.size(1), "paired_rows CPU kernel: vocabulary sizes differ");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.is_contiguous(),
              "paired_rows CPU kernel: labels must be contiguous 1-D int64");
  TORCH_CHECK(labels.numel() + ref_logits.size(0) == logits.size(0),
              "paired_rows CPU kernel: logits must have labels.numel() + ref_logits.size(0) rows");
  TORCH_CHECK(kl_valid.numel() == 0 || (kl_valid.scalar_type() == at::kBool && kl_valid.numel() == ref_logits.size(0)
                                        && kl_valid.is_contiguous()),
              "paired_rows CPU kernel: kl_valid must be empty or one bool per ref_logits row");
  const bool fp64 = logits.scalar_type() == at::kDouble;
  TORCH_CHECK(fp64 == (ref_logits.scalar_type() == at::kDouble),
              "paired_rows CPU kernel: float64 logits need float64 ref_logits and vice versa");
  const at::ScalarType acc = fp64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(scales.scalar_type() == acc && scales.numel() == 2 && scales.is_contiguous(),
              "paired_rows CPU kernel: scales must hold 2 values of the accumulation dtype");
  for (const auto* t : {&logits, &labels, &ref_logits, &kl_valid, &scales}) {
    TORCH_CHECK(t->device().is_cpu(), "paired_rows CPU kernel: every tensor must be on the CPU");
  }
  if (!fp64) tile_kernels();  // picked (and a bad SEAT_CPU_ISA refused) before any parallel region
  at::Tensor per_row = at::empty({logits.size(0)}, logits.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  if (logits.size(0) == 0) return {per_row, grad};
  if (fp64) {
    paired_rows_typed<double, double, double>(logits, labels, ref_logits, kl_valid, scales, temperature,
                                              ignore_index, reverse, per_row, grad);
  } else {
    dispatch_half_float(logits.scalar_type(), "logits", [&](auto tc) {
      dispatch_half_float(ref_logits.scalar_type(), "ref_logits", [&](auto tr) {
        paired_rows_typed<typename decltype(tc)::type, typename decltype(tr)::type, float>(
            logits, labels, ref_logits, kl_valid, scales, temperature, ignore_index, reverse, per_row, grad);
      });
    });
  }
  return {per_row, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) { m.impl("paired_rows", &paired_rows_cpu); }
