// CPU kernel of the fused log-softmax losses (seat_C::paired_rows, used by kl_div,
// paired_loss and fused_linear_paired_loss): rows in parallel (at::parallel_for, i.e.
// OpenMP), each row read twice, tile by tile (kTile elements: the tile stays in L1
// between the loops that read it).
//   pass 1: online log-softmax of both inputs at once: per tile the maxima, then e^{x - m}
//           (and the KL weights) summed -> the row's loss, formed in double;
//   pass 2: the gradient w.r.t. the row's logits, written straight into the output.
// The loops read and write the tensors' own dtypes (bf16 / fp16 converted in registers),
// so no N x V temporary exists besides the gradient. float rows use a branch-free exp in
// W-lane vector code (kl_div_vec.h) compiled for AVX-512 (W = 16), AVX2 (W = 8) and the
// baseline target (W = 4), picked at first use from the CPU's features; double rows (the
// oracle tests) run scalar loops with libm's exp.
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

constexpr int kTile = 2048;  // elements per tile: the tiles of both inputs stay in L1
constexpr int kLanes = 16;   // the row's double partial sums

#define SEAT_ALWAYS_INLINE inline __attribute__((always_inline))

// exp for x <= 0 (every argument here is x - running max or x - lse): Cephes' expf
// polynomial, ~1 ulp, selects instead of branches so the loops vectorize. Below -87.3 it
// returns 0 where expf would return a denormal (< 1.2e-38); -inf gives 0, NaN stays NaN.
// kl_div_vec.h's vexp is this on W lanes; double uses libm.
struct FastExp {
  static SEAT_ALWAYS_INLINE double exp(double x) { return std::exp(x); }
};

// max that keeps a NaN once seen (a NaN logit makes the whole row NaN, as in torch).
template <typename A>
SEAT_ALWAYS_INLINE A nan_max(A m, A x) {
  return (x > m || x != x) ? x : m;
}

// A row's sums in kLanes double partial sums whatever the input dtype: s = sum e^{x - m},
// a = sum_{e > 0} e^{x - m} (t - o) (the KL target's weights). Merged pairwise at the end:
// the row sums carry no summation error a float loss could show.
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

// Row constants of the gradient pass.
template <typename A>
struct GradConsts {
  A m_c, ls_c, m_r, ls_r, dlse, kl, factor;
};

// The tile loops of one (logits dtype TC, reference dtype TR, accumulation A): n <= kTile
// elements from the given pointers; `scale` is 1/temperature (KL rows only).
//   pair_max(c, r, n, &mc, &mr)         unscaled maxima of c and r (NaN once seen)
//   pair_sums(c, r, n, scale, mc, mr, target_is_cur, cs, rs)
//                                       s of both, a of the KL target (mc, mr: the
//                                       scaled running maxima, 0 while only -inf seen)
//   kl_grad(c, r, n, scale, k, reverse, g)   the KL gradient into g
//   max(x, n) / sums(x, n, m, acc) / ce_grad(x, n, label - tile start, m, ls, factor, g)
//                                       the same for a CE row (no temperature)
template <typename TC, typename TR, typename A>
struct Tiles {
  void (*pair_max)(const TC*, const TR*, int, A*, A*);
  void (*pair_sums)(const TC*, const TR*, int, A, A, A, bool, LaneSums&, LaneSums&);
  void (*kl_grad)(const TC*, const TR*, int, A, const GradConsts<A>&, bool, TC*);
  A (*max)(const TC*, int);
  void (*sums)(const TC*, int, A, LaneSums&);
  void (*ce_grad)(const TC*, int, int64_t, A, A, A, TC*);
};
template <typename TC, typename TR>
using FloatTiles = Tiles<TC, TR, float>;

// float64 rows: plain loops with libm's exp (the float64-oracle tests compare these).
namespace exact {
void pair_max(const double* c, const double* r, int n, double* mc, double* mr) {
  double a = seat::neg_inf<double>(), b = a;
  for (int j = 0; j < n; ++j) {
    a = nan_max(a, c[j]);
    b = nan_max(b, r[j]);
  }
  *mc = a;
  *mr = b;
}

void pair_sums(const double* c, const double* r, int n, double scale, double mc, double mr, bool target_is_cur,
               LaneSums& cs, LaneSums& rs) {
  LaneSums& target = target_is_cur ? cs : rs;
  for (int j = 0; j < n; ++j) {
    const double cv = c[j] * scale, rv = r[j] * scale;
    const double ec = std::exp(cv - mc), er = std::exp(rv - mr);
    cs.s[j % kLanes] += ec;
    rs.s[j % kLanes] += er;
    const double e = target_is_cur ? ec : er, w = target_is_cur ? cv - rv : rv - cv;
    target.a[j % kLanes] += e > 0.0 ? e * w : 0.0;  // no mass (-inf, underflow): no weight
  }
}

void kl_grad(const double* c, const double* r, int n, double scale, const GradConsts<double>& k, bool reverse,
             double* g) {
  for (int j = 0; j < n; ++j) {
    const double cv = c[j] * scale, rv = r[j] * scale;
    g[j] = reverse ? seat::kl_reverse_grad<double, FastExp>(cv, rv, k.m_c, k.ls_c, k.dlse, k.kl, k.factor)
                   : seat::kl_forward_grad<double, FastExp>(cv, rv, k.m_c, k.ls_c, k.m_r, k.ls_r, k.factor);
  }
}

double row_max(const double* x, int n) {
  double m = seat::neg_inf<double>();
  for (int j = 0; j < n; ++j) m = nan_max(m, x[j]);
  return m;
}

void row_sums(const double* x, int n, double m, LaneSums& acc) {
  for (int j = 0; j < n; ++j) acc.s[j % kLanes] += std::exp(x[j] - m);
}

void ce_grad(const double* x, int n, int64_t label, double m, double ls, double factor, double* g) {
  for (int j = 0; j < n; ++j) g[j] = seat::ce_grad<double, FastExp>(x[j], m, ls, j == label, factor);
}

const Tiles<double, double, double>& tiles() {
  static const Tiles<double, double, double> t{pair_max, pair_sums, kl_grad, row_max, row_sums, ce_grad};
  return t;
}
}  // namespace exact

// The float tile loops (kl_div_vec.h) compiled once per instruction set, picked at first
// use from what the CPU reports (__builtin_cpu_supports; GCC's target_clones("arch=...")
// picks by CPU model and ran the baseline copy on every AMD CPU). The loops are full of
// selects on floats (x == -inf, e > 0, the exp's range clamp); under GCC's default
// -ftrapping-math it will not turn them into vector blends. Values are unchanged (no
// floating-point exceptions are observed here).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
namespace baseline {
constexpr int W = 4;
#define SEAT_VEC_F16C 0
#include "kl_div_vec.h"
#undef SEAT_VEC_F16C
}  // namespace baseline
#ifdef SEAT_CPU_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int W = 8;
#define SEAT_VEC_F16C 1
#include "kl_div_vec.h"
#undef SEAT_VEC_F16C
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
constexpr int W = 16;
#define SEAT_VEC_F16C 1
#include "kl_div_vec.h"
#undef SEAT_VEC_F16C
}  // namespace avx512
#pragma GCC pop_options
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The copy seat::cpu::cpu_isa() picks (this CPU's best, or SEAT_CPU_ISA's).
template <typename TC, typename TR>
const FloatTiles<TC, TR>& float_tiles() {
  static const FloatTiles<TC, TR> chosen = [] {
#ifdef SEAT_CPU_ISA_COPIES
    switch (seat::cpu::cpu_isa()) {
      case seat::cpu::Isa::kAvx512: return avx512::make_tiles<TC, TR>();
      case seat::cpu::Isa::kAvx2: return avx2::make_tiles<TC, TR>();
      case seat::cpu::Isa::kBaseline: break;
    }
#endif
    return baseline::make_tiles<TC, TR>();
  }();
  return chosen;
}

// A row's running state for one input: the max so far (NaN once a NaN is seen) and the
// lane sums relative to it.
template <typename A>
struct RowSums {
  A m = seat::neg_inf<A>();
  LaneSums lanes{};
};

// Take a tile's max into the running state (rescaling what was summed when it grows) and
// return the max the tile's exponentials are taken against: 0 while only -inf was seen
// (e^{-inf - 0} = 0 adds nothing, where -inf - -inf would be NaN).
template <typename A>
inline A advance(RowSums<A>& st, A tile_max) {
  const A m = nan_max(st.m, tile_max);
  if (m == seat::neg_inf<A>()) return A(0);
  if (!(m == st.m)) {  // k = 0 on the first finite tile
    const double k = std::exp(static_cast<double>(st.m) - static_cast<double>(m));
    for (int l = 0; l < kLanes; ++l) {
      st.lanes.s[l] *= k;
      st.lanes.a[l] *= k;
    }
  }
  st.m = m;
  return m;
}

// The row's (max, sum, weighted sum) in double, for the loss formulas of seat/kl_div.h.
template <typename A>
inline seat::OnlineLse<double> row_state(const RowSums<A>& st) {
  return {static_cast<double>(st.m), lane_total(st.lanes.s), lane_total(st.lanes.a)};
}

template <typename TC>
void zero_row(TC* grad, int64_t vocab) {
  if (grad != nullptr) std::fill(grad, grad + vocab, static_cast<TC>(0.f));
}

// Storage -> accumulation type (bf16 / fp16 through float, exactly).
template <typename A, typename T>
inline A to_acc(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<A>(static_cast<float>(v));
  }
}

inline int tile_size(int64_t vocab, int64_t v0) { return static_cast<int>(std::min<int64_t>(kTile, vocab - v0)); }

// KL(p_ref || p_cur) (reverse: KL(p_cur || p_ref)) of one row, and its gradient (times
// factor) into grad when given. The loss is formed in double from the double row sums.
template <typename TC, typename TR, typename A>
A kl_row(const Tiles<TC, TR, A>& k, const TC* cur, const TR* ref, int64_t vocab, A inv_t, A factor, bool reverse,
         TC* grad) {
  RowSums<A> cs, rs;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int n = tile_size(vocab, v0);
    A mc, mr;
    k.pair_max(cur + v0, ref + v0, n, &mc, &mr);
    // max(x) / T == max(x / T): rounding is monotonic
    mc = advance(cs, mc * inv_t);
    mr = advance(rs, mr * inv_t);
    k.pair_sums(cur + v0, ref + v0, n, inv_t, mc, mr, reverse, cs.lanes, rs.lanes);
  }
  const seat::OnlineLse<double> sc = row_state(cs), sr = row_state(rs);
  const double kl = reverse ? seat::kl_value(sc, sr) : seat::kl_value(sr, sc);
  if (grad != nullptr) {
    const GradConsts<A> consts{cs.m, static_cast<A>(seat::online_log_s(sc)), rs.m,
                               static_cast<A>(seat::online_log_s(sr)), static_cast<A>(seat::lse_difference(sc, sr)),
                               static_cast<A>(kl), factor};
    for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
      k.kl_grad(cur + v0, ref + v0, tile_size(vocab, v0), inv_t, consts, reverse, grad + v0);
    }
  }
  return static_cast<A>(kl);
}

// Cross-entropy of one row against `label`, and its gradient (times factor) when asked.
template <typename TC, typename TR, typename A>
A ce_row(const Tiles<TC, TR, A>& k, const TC* x, int64_t vocab, int64_t label, A factor, TC* grad) {
  RowSums<A> st;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int n = tile_size(vocab, v0);
    const A m = advance(st, k.max(x + v0, n));
    k.sums(x + v0, n, m, st.lanes);
  }
  const seat::OnlineLse<double> state = row_state(st);
  const double ls = seat::online_log_s(state);
  if (grad != nullptr) {
    for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
      k.ce_grad(x + v0, tile_size(vocab, v0), label - v0, st.m, static_cast<A>(ls), factor, grad + v0);
    }
  }
  return static_cast<A>((state.m - static_cast<double>(to_acc<A>(x[label]))) + ls);
}

template <typename TC, typename TR, typename A>
void paired_rows_typed(const Tiles<TC, TR, A>& k, const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& ref, const at::Tensor& kl_valid, const at::Tensor& scales,
                       double temperature, int64_t ignore_index, bool reverse, at::Tensor& per_row,
                       at::Tensor& grad) {
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
      out[i] = ce_row(k, x + i * vocab, vocab, label, ce_factor, grow);
    }
  };
  auto kl = [&](int64_t j) {
    const int64_t i = n_ce + j;
    TC* grow = g != nullptr ? g + i * vocab : nullptr;
    if (valid != nullptr && !valid[j]) {  // masked x~ row
      out[i] = A(0);
      zero_row(grow, vocab);
    } else {
      out[i] = kl_row(k, x + i * vocab, r + j * vocab, vocab, inv_t, kl_factor, reverse, grow);
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
  at::Tensor per_row = at::empty({logits.size(0)}, logits.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  if (logits.size(0) == 0) return {per_row, grad};
  if (fp64) {
    paired_rows_typed(exact::tiles(), logits, labels, ref_logits, kl_valid, scales, temperature, ignore_index,
                      reverse, per_row, grad);
  } else {
    dispatch_half_float(logits.scalar_type(), "logits", [&](auto tc) {
      dispatch_half_float(ref_logits.scalar_type(), "ref_logits", [&](auto tr) {
        // picked (and a bad SEAT_CPU_ISA refused) here, before any parallel region
        const auto& tiles = float_tiles<typename decltype(tc)::type, typename decltype(tr)::type>();
        paired_rows_typed(tiles, logits, labels, ref_logits, kl_valid, scales, temperature, ignore_index, reverse,
                          per_row, grad);
      });
    });
  }
  return {per_row, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) { m.impl("paired_rows", &paired_rows_cpu); }
