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
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"
#include "seat/kl_div.h"

namespace {

constexpr int kTile = 2048;  // elements per tile: the tiles of both inputs stay in L1
constexpr int kLanes = 16;   // the row's double partial sums

#define SEAT_ALWAYS_INLINE inline __attribute__((always_inline))

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
    g[j] = reverse ? seat::kl_reverse_grad<double>(cv, rv, k.m_c, k.ls_c, k.dlse, k.kl, k.factor)
                   : seat::kl_forward_grad<double>(cv, rv, k.m_c, k.ls_c, k.m_r, k.ls_r, k.factor);
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
  for (int j = 0; j < n; ++j) g[j] = seat::ce_grad<double>(x[j], m, ls, j == label, factor);
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
#define SEAT_VEC_W 4
#define SEAT_VEC_F16C 0
#include "kl_div_vec.h"
#undef SEAT_VEC_F16C
#undef SEAT_VEC_W
}  // namespace baseline
#ifdef SEAT_CPU_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define SEAT_VEC_W 8
#define SEAT_VEC_F16C 1
#include "kl_div_vec.h"
#undef SEAT_VEC_F16C
#undef SEAT_VEC_W
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define SEAT_VEC_W 16
#define SEAT_VEC_F16C 1
#include "kl_div_vec.h"
#undef SEAT_VEC_F16C
#undef SEAT_VEC_W
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

// Elements of the tile at v0 in a range ending at `end`.
inline int tile_size(int64_t end, int64_t v0) { return static_cast<int>(std::min<int64_t>(kTile, end - v0)); }

// Merge another part of the same row (a later vocabulary range) into st.
template <typename A>
inline void merge(RowSums<A>& st, const RowSums<A>& part) {
  const A m = nan_max(st.m, part.m);
  if (m == seat::neg_inf<A>()) return;  // only -inf in both
  const double k_st = std::exp(static_cast<double>(st.m) - static_cast<double>(m));
  const double k_part = std::exp(static_cast<double>(part.m) - static_cast<double>(m));
  for (int l = 0; l < kLanes; ++l) {
    st.lanes.s[l] = st.lanes.s[l] * k_st + part.lanes.s[l] * k_part;
    st.lanes.a[l] = st.lanes.a[l] * k_st + part.lanes.a[l] * k_part;
  }
  st.m = m;
}

// One row of the batch: a KL row (ref given) or a CE row against `label`.
template <typename TC, typename TR>
struct Row {
  const TC* x;
  const TR* ref;  // null: a CE row
  int64_t label;
  TC* grad;  // null: no gradient wanted
};

// Pass 1 over the vocabulary range [v0, v1) (tile-aligned): the running states of the row's
// inputs (for a CE row, st[0] only).
template <typename TC, typename TR, typename A>
void row_sums_range(const Tiles<TC, TR, A>& k, const Row<TC, TR>& row, int64_t v0, int64_t v1, A inv_t,
                    bool reverse, RowSums<A>* st) {
  for (int64_t t = v0; t < v1; t += kTile) {
    const int n = tile_size(v1, t);
    if (row.ref != nullptr) {
      A mc, mr;
      k.pair_max(row.x + t, row.ref + t, n, &mc, &mr);
      // max(x) / T == max(x / T): rounding is monotonic
      mc = advance(st[0], mc * inv_t);
      mr = advance(st[1], mr * inv_t);
      k.pair_sums(row.x + t, row.ref + t, n, inv_t, mc, mr, reverse, st[0].lanes, st[1].lanes);
    } else {
      const A m = advance(st[0], k.max(row.x + t, n));
      k.sums(row.x + t, n, m, st[0].lanes);
    }
  }
}

// The row's loss (KL(p_ref || p_cur), reverse: KL(p_cur || p_ref), or the CE), formed in
// double from the double row sums, and the constants of its gradient pass.
template <typename TC, typename TR, typename A>
A row_loss(const Row<TC, TR>& row, const RowSums<A>* st, A factor, bool reverse, GradConsts<A>* consts) {
  const seat::OnlineLse<double> s0 = row_state(st[0]);
  if (row.ref == nullptr) {
    const double ls = seat::online_log_s(s0);
    *consts = GradConsts<A>{st[0].m, static_cast<A>(ls), A(0), A(0), A(0), A(0), factor};
    return static_cast<A>((s0.m - static_cast<double>(to_acc<A>(row.x[row.label]))) + ls);
  }
  const seat::OnlineLse<double> s1 = row_state(st[1]);
  const double kl = reverse ? seat::kl_value(s0, s1) : seat::kl_value(s1, s0);
  *consts = GradConsts<A>{st[0].m, static_cast<A>(seat::online_log_s(s0)), st[1].m,
                          static_cast<A>(seat::online_log_s(s1)), static_cast<A>(seat::lse_difference(s0, s1)),
                          static_cast<A>(kl), factor};
  return static_cast<A>(kl);
}

// Pass 2 over [v0, v1): the row's gradient (times factor).
template <typename TC, typename TR, typename A>
void row_grad_range(const Tiles<TC, TR, A>& k, const Row<TC, TR>& row, int64_t v0, int64_t v1, A inv_t,
                    bool reverse, const GradConsts<A>& c) {
  for (int64_t t = v0; t < v1; t += kTile) {
    const int n = tile_size(v1, t);
    if (row.ref != nullptr) {
      k.kl_grad(row.x + t, row.ref + t, n, inv_t, c, reverse, row.grad + t);
    } else {
      k.ce_grad(row.x + t, n, row.label - t, c.m_c, c.ls_c, c.factor, row.grad + t);
    }
  }
}

template <typename TC, typename TR, typename A>
void paired_rows_typed(const Tiles<TC, TR, A>& k, const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& ref, const at::Tensor& kl_valid, const at::Tensor& scales,
                       double temperature, int64_t ignore_index, bool reverse, at::Tensor& per_row,
                       at::Tensor& grad) {
  const int64_t n_rows = logits.size(0), vocab = logits.size(1), n_ce = labels.numel(), n_kl = n_rows - n_ce;
  const TC* x = static_cast<const TC*>(logits.data_ptr());
  const TR* r = static_cast<const TR*>(ref.data_ptr());
  const int64_t* lab = labels.data_ptr<int64_t>();
  const bool* valid = kl_valid.numel() > 0 ? kl_valid.data_ptr<bool>() : nullptr;
  const A ce_factor = scales.data_ptr<A>()[0], kl_factor = scales.data_ptr<A>()[1];
  const A inv_t = static_cast<A>(1.0 / temperature);
  A* out = per_row.data_ptr<A>();
  TC* g = grad.numel() > 0 ? static_cast<TC*>(grad.data_ptr()) : nullptr;
  // Row i, or false for an ignored x row / a masked x~ row (no loss, no gradient).
  auto row_at = [&](int64_t i, Row<TC, TR>* row) {
    TC* grow = g != nullptr ? g + i * vocab : nullptr;
    const bool is_ce = i < n_ce;
    if (is_ce ? lab[i] == ignore_index : (valid != nullptr && !valid[i - n_ce])) {
      out[i] = A(0);
      zero_row(grow, vocab);
      return false;
    }
    *row = is_ce ? Row<TC, TR>{x + i * vocab, nullptr, lab[i], grow}
                 : Row<TC, TR>{x + i * vocab, r + (i - n_ce) * vocab, 0, grow};
    return true;
  };
  auto whole_row = [&](int64_t i) {
    Row<TC, TR> row;
    if (!row_at(i, &row)) return;
    RowSums<A> st[2];
    row_sums_range(k, row, 0, vocab, inv_t, reverse, st);
    GradConsts<A> consts;
    out[i] = row_loss(row, st, i < n_ce ? ce_factor : kl_factor, reverse, &consts);
    if (row.grad != nullptr) row_grad_range(k, row, 0, vocab, inv_t, reverse, consts);
  };
  const int64_t threads = at::get_num_threads(), tiles = (vocab + kTile - 1) / kTile;
  if (n_rows >= threads || tiles < 2) {
    // Rows are independent. Work item j is CE row j and KL row j (where they exist): a KL
    // row reads two inputs, a CE row one, and contiguous ranges of rows would give one
    // thread the x rows and another the x~ rows. A few items per task when rows are short.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1));
    at::parallel_for(0, std::max(n_ce, n_kl), grain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        if (j < n_ce) whole_row(j);
        if (j < n_kl) whole_row(n_ce + j);
      }
    });
    return;
  }
  // Fewer rows than threads: each row's vocabulary in `parts` tile-aligned ranges, pass 1 on
  // every (row, range), the ranges' states merged in order, then pass 2 on every range.
  const int64_t parts = std::min(tiles, (threads + n_rows - 1) / n_rows);
  const int64_t span = (tiles + parts - 1) / parts * kTile;
  std::vector<Row<TC, TR>> rows(n_rows);
  std::vector<char> live(n_rows);
  for (int64_t i = 0; i < n_rows; ++i) live[i] = row_at(i, &rows[i]);
  std::vector<RowSums<A>> st(n_rows * parts * 2);
  at::parallel_for(0, n_rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / parts, v0 = (w % parts) * span;
      if (live[i] && v0 < vocab) row_sums_range(k, rows[i], v0, std::min(vocab, v0 + span), inv_t, reverse, &st[2 * w]);
    }
  });
  std::vector<GradConsts<A>> consts(n_rows);
  for (int64_t i = 0; i < n_rows; ++i) {
    if (!live[i]) continue;
    RowSums<A>* first = &st[2 * i * parts];
    for (int64_t p = 1; p < parts; ++p) {
      merge(first[0], first[2 * p]);
      merge(first[1], first[2 * p + 1]);
    }
    out[i] = row_loss(rows[i], first, i < n_ce ? ce_factor : kl_factor, reverse, &consts[i]);
  }
  if (g == nullptr) return;
  at::parallel_for(0, n_rows * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / parts, v0 = (w % parts) * span;
      if (live[i] && v0 < vocab) row_grad_range(k, rows[i], v0, std::min(vocab, v0 + span), inv_t, reverse, consts[i]);
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
