// CPU kernels of the sparse-update family (seat_C::masked_gather_, masked_swap_,
// sparse_adamw_, implicit_block_counts_) for every mask encoding. Each operation is
// written once over a mask policy P (seat/masks.h) and walks its entries with
// for_each_run<P>, which hands it runs of entries (positions as an int32 array, slots
// consecutive) so that its loop works on arrays: AdamW's math runs 16 (AVX-512) or 8
// (AVX2) entries per instruction, and every encoding gets the same loops.
// dispatch_encoding is the one place that turns the runtime `encoding` into a policy.
// Inputs were validated by python/seat/ops; the TORCH_CHECKs here guard direct callers,
// and the walks never yield a position or slot outside the tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <utility>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "dtype_io.h"
#include "isa.h"
#include "mask_ref.h"
#include "member_words.h"
#include "seat/adamw.h"
#include "seat/masks.h"

namespace {

using seat::Block16Mask;
using seat::FullMask;
using seat::HashMask;
using seat::IndexMask;
using seat::MaskRef;
using seat::cpu::Tag;

// Entries below which an OpenMP region costs more than it saves (index and block16 masks).
constexpr int64_t kMoveGrain = 1 << 15;   // gather and swap: a load and a store per entry
constexpr int64_t kAdamWGrain = 1 << 14;  // AdamW: a few dozen flops more per entry
// Hash masks: blocks below which threads cost more than they save (a block is hundreds
// to tens of thousands of hashes, whatever the density).
constexpr int64_t kParallelBlocks = 8;
// Index and block16 walks hand over their entries in runs of at most this many (the
// bounds of a run are checked in one vectorizable pass over it, in cache for the op).
constexpr int64_t kRunEntries = 4096;
// An op asks for the cache line of the entry this many entries ahead in its run: the
// hardware prefetcher follows the ascending positions, but not far enough ahead.
constexpr int64_t kPrefetchAhead = 64;

// ----------------------------------------------------------------------------- walks

using seat::cpu::member_positions;
using seat::cpu::member_words;
using seat::cpu::MemberPositions;
using seat::cpu::MemberWords;
using seat::cpu::words_of;

// A run of entries: entry k is at position base + rel[k] and has slot slot + k. Every
// walk below hands an op runs whose positions lie in [0, numel) and whose slots lie in
// [0, nnz) (entries a mask places outside are dropped: as P::visit does), in increasing
// slot order within a thread; an op then works on arrays, not entry by entry.
// `ahead` entries of rel past the run may be read to prefetch their lines (an index
// walk's next run: the op's prefetches then run on across runs instead of restarting
// cold at each; their positions are not checked, and need not be: a prefetch of any
// address is harmless).
struct Run {
  const int32_t* rel;
  int64_t base, slot, n;
  int64_t ahead = 0;
};

// Runs<P>::run(m, grain, op) calls op(run) for every run of m's entries, in parallel when
// m has more than `grain` entries; op.lines() is (the address of element 0, the element
// size) of the array op will touch at the entries' positions, for walks that find the
// positions by computation and prefetch as they go (hash masks).
//
// Every walk runs on per-thread copies of the mask and of the op: read through
// references, they would live on the calling thread's stack, whose cache lines that
// thread keeps writing while the others read them (measured: +30% on a hash gather with
// 2 threads). Work is statically scheduled in contiguous ranges, so each thread walks
// memory upward (what the hardware prefetcher follows).
template <typename P>
struct Runs;

// n entries at positions base + rel[k] (base >= 0), slots slot + k, as runs: one run
// when every position is inside [base, numel), else the valid entries one at a time (a
// mask that lies is skipped, not followed). The check is one pass of unsigned
// comparisons that vectorizes on every ISA (signed min / max need SSE4.1: as scalar code
// they cost 5% of a gather).
template <typename Op>
inline void checked_runs(const Op& op, const int32_t* rel, int64_t base, int64_t slot, int64_t n, int64_t numel,
                         int64_t ahead = 0) {
  const uint32_t limit = static_cast<uint32_t>(std::clamp<int64_t>(numel - base, 0, int64_t{1} << 31));
  uint32_t outside = 0;
  for (int64_t k = 0; k < n; ++k) outside |= static_cast<uint32_t>(static_cast<uint32_t>(rel[k]) >= limit);
  if (outside == 0) return op(Run{rel, base, slot, n, ahead});
  for (int64_t k = 0; k < n; ++k) {
    const int64_t pos = base + rel[k];
    if (pos >= 0 && pos < numel) op(Run{rel + k, base, slot + k, 1});
  }
}

// int32 indices: runs of kRunEntries consecutive entries, the index itself as rel.
template <>
struct Runs<IndexMask> {
  template <typename Op>
  static void run(const MaskRef& mask, int64_t grain, const Op& op_in) {
#pragma omp parallel if (mask.nnz > grain) num_threads(at::get_num_threads())
    {
      const MaskRef m = mask;
      const Op op = op_in;
      const int64_t n_runs = (m.nnz + kRunEntries - 1) / kRunEntries;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < n_runs; ++r) {
        const int64_t first = r * kRunEntries;
        const int64_t n = std::min(kRunEntries, m.nnz - first);
        checked_runs(op, m.index + first, 0, first, n, m.numel, std::min(kPrefetchAhead, m.nnz - first - n));
      }
    }
  }
};

// block16: per 65536-element block, its entries' uint16 offsets widened to int32 (in
// pieces of kRunEntries), base the block's first element.
template <>
struct Runs<Block16Mask> {
  template <typename Op>
  static void run(const MaskRef& mask, int64_t grain, const Op& op_in) {
#pragma omp parallel if (mask.nnz > grain) num_threads(at::get_num_threads())
    {
      const MaskRef m = mask;
      const Op op = op_in;
      std::vector<int32_t> rel(kRunEntries);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < m.n_blocks; ++b) {
        const int64_t base = b * seat::kBlock16;
        const int64_t begin = std::max<int64_t>(m.index[b], 0), end = std::min<int64_t>(m.index[b + 1], m.nnz);
        for (int64_t first = begin; first < end; first += kRunEntries) {
          const int64_t n = std::min(kRunEntries, end - first);
          for (int64_t k = 0; k < n; ++k) rel[k] = m.offsets[first + k];
          if (base + seat::kBlock16 <= m.numel) {  // a whole block: every uint16 offset is inside
            op(Run{rel.data(), base, first, n});
          } else {
            checked_runs(op, rel.data(), base, first, n, m.numel);
          }
        }
      }
    }
  }
};

// Every element: positions 0 .. nnz - 1 in order, as runs over one shared 0, 1, 2, ...
template <>
struct Runs<FullMask> {
  template <typename Op>
  static void run(const MaskRef& mask, int64_t grain, const Op& op_in) {
    std::vector<int32_t> iota(kRunEntries);
    for (int64_t k = 0; k < kRunEntries; ++k) iota[k] = static_cast<int32_t>(k);
    const int32_t* rel = iota.data();
#pragma omp parallel if (mask.nnz > grain) num_threads(at::get_num_threads())
    {
      const Op op = op_in;
      const int64_t n = mask.nnz < mask.numel ? mask.nnz : mask.numel;
      const int64_t n_runs = (n + kRunEntries - 1) / kRunEntries;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < n_runs; ++r) {
        const int64_t first = r * kRunEntries;
        op(Run{rel, first, first, std::min(kRunEntries, n - first)});
      }
    }
  }
};

// Hash masks: per block, the members' positions (member_positions: hashed 16 or 8 lanes
// at a time, the lines of op.lines() prefetched group by group as they are hashed), numbered from
// block_offsets[b] and cut at the next block's first slot and nnz (HashMask::visit's
// bounds); a block with no slots is not hashed at all.
template <>
struct Runs<HashMask> {
  template <typename Op>
  static void run(const MaskRef& mask, int64_t, const Op& op_in) {
    const MemberPositions positions_fn = member_positions();
#pragma omp parallel if (mask.n_blocks > kParallelBlocks) num_threads(at::get_num_threads())
    {
      const MaskRef m = mask;
      const Op op = op_in;
      const auto [lines, elem_size] = op.lines();
      std::vector<int32_t> rel(static_cast<size_t>(m.block + 16));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < m.n_blocks; ++b) {
        const int64_t slot = m.index[b];
        const int64_t limit = std::min<int64_t>(m.index[b + 1], m.nnz);
        if (slot < 0 || slot >= limit) continue;
        const int64_t begin = b * m.block;
        const int64_t len = std::min(m.block, m.numel - begin);
        const int64_t found = positions_fn(m.key, begin, len, m.threshold, rel.data(), lines + begin * elem_size,
                                           elem_size);
        op(Run{rel.data(), begin, slot, std::min(found, limit - slot)});
      }
    }
  }
};

template <typename P, typename Op>
void for_each_run(const MaskRef& m, int64_t grain, const Op& op) {
  Runs<P>::run(m, grain, op);
}

// ----------------------------------------------------------------------------- masks

using seat::cpu::check_hash;
using seat::cpu::check_mask_tensor;
using seat::cpu::dispatch_encoding;
using seat::cpu::mask_ref;

void check_dense(const at::Tensor& t, const char* name, const char* who) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), who, ": ", name, " must be a contiguous CPU tensor");
}

// ----------------------------------------------------------------------------- gather

// out += x in out's type. A bf16 out (the lean compact gradient) adds in fp32 and rounds
// once to nearest-even, so a gather into a zeroed buffer is exactly the bf16 rounding of
// the gradient; accumulating further micro-batches rounds again each time.
template <typename Out, typename In>
inline void accumulate(Out& out, In x) {
  out = out + static_cast<Out>(x);
}
template <typename In>
inline void accumulate(c10::BFloat16& out, In x) {
  out = c10::BFloat16(static_cast<float>(out) + static_cast<float>(x));
}

template <typename Out, typename In>
struct GatherOp {
  Out* out;
  const In* dense;
  std::pair<const char*, int64_t> lines() const { return {reinterpret_cast<const char*>(dense), sizeof(In)}; }
  void operator()(const Run& r) const {
    const In* d = dense + r.base;
    Out* o = out + r.slot;
    for (int64_t k = 0; k < r.n; ++k) {
      if (k + kPrefetchAhead < r.n + r.ahead) __builtin_prefetch(d + r.rel[k + kPrefetchAhead], 0);
      accumulate(o[k], d[r.rel[k]]);
    }
  }
};

template <typename P, typename Out, typename In>
void gather(const MaskRef& m, Out* out, const In* dense) {
  for_each_run<P>(m, kMoveGrain, GatherOp<Out, In>{out, dense});
}

void masked_gather_cpu(at::Tensor out, const at::Tensor& dense, int64_t encoding, const at::Tensor& mask_index,
                       const at::Tensor& mask_offsets, at::IntArrayRef mask_ints) {
  constexpr const char* who = "masked_gather_ CPU kernel";
  check_dense(out, "out", who);
  check_dense(dense, "dense", who);
  TORCH_CHECK(out.dim() == 1, who, ": out must be 1-D");
  TORCH_CHECK(mask_ints.size() == seat::kMaskInts, who, ": mask_ints must hold ", seat::kMaskInts, " ints");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble ||
                  out.scalar_type() == at::kBFloat16,
              who, ": out must be float32, float64 or bfloat16");
  dispatch_encoding(encoding, who, [&](auto policy) {
    using P = decltype(policy);
    const MaskRef m = mask_ref(policy, mask_index, mask_offsets, mask_ints, dense.numel(), out.numel(), who);
    if (m.nnz == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "masked_gather_cpu_out", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "masked_gather_cpu_in", [&] {
        gather<P>(m, out.data_ptr<out_t>(), dense.data_ptr<scalar_t>());
      });
    });
  });
}

// ----------------------------------------------------------------------------- swap

template <typename Bits>
struct SwapOp {
  Bits* param;
  Bits* values;
  std::pair<const char*, int64_t> lines() const { return {reinterpret_cast<const char*>(param), sizeof(Bits)}; }
  void operator()(const Run& r) const {
    Bits* p = param + r.base;
    Bits* v = values + r.slot;
    for (int64_t k = 0; k < r.n; ++k) {
      if (k + kPrefetchAhead < r.n + r.ahead) __builtin_prefetch(p + r.rel[k + kPrefetchAhead], 1);
      seat::swap_bits<Bits>(p + r.rel[k], v + k);
    }
  }
};

template <typename P, typename Bits>
void swap(const MaskRef& m, void* param, void* values) {
  for_each_run<P>(m, kMoveGrain, SwapOp<Bits>{static_cast<Bits*>(param), static_cast<Bits*>(values)});
}

// The swap moves bits, not numbers, so it dispatches on the element width only.
void masked_swap_cpu(at::Tensor param, at::Tensor values, int64_t encoding, const at::Tensor& mask_index,
                     const at::Tensor& mask_offsets, at::IntArrayRef mask_ints) {
  constexpr const char* who = "masked_swap_ CPU kernel";
  check_dense(param, "param", who);
  check_dense(values, "values", who);
  TORCH_CHECK(values.dim() == 1, who, ": values must be 1-D");
  TORCH_CHECK(param.scalar_type() == values.scalar_type(), who, ": values must have param's dtype");
  TORCH_CHECK(mask_ints.size() == seat::kMaskInts, who, ": mask_ints must hold ", seat::kMaskInts, " ints");
  dispatch_encoding(encoding, who, [&](auto policy) {
    using P = decltype(policy);
    const MaskRef m = mask_ref(policy, mask_index, mask_offsets, mask_ints, param.numel(), values.numel(), who);
    if (m.nnz == 0) return;
    void* p = param.data_ptr();
    void* v = values.data_ptr();
    switch (param.element_size()) {
      case 1: return swap<P, uint8_t>(m, p, v);
      case 2: return swap<P, uint16_t>(m, p, v);
      case 4: return swap<P, uint32_t>(m, p, v);
      case 8: return swap<P, uint64_t>(m, p, v);
      default: TORCH_CHECK(false, who, ": unsupported element size ", param.element_size());
    }
  });
}

// ----------------------------------------------------------------------------- AdamW

// One parameter's tensors and flags (key: its stochastic-rounding key).
struct AdamWArgs {
  const at::Tensor& param;
  const at::Tensor& grad;
  const at::Tensor& exp_avg;
  const at::Tensor& exp_avg_sq;
  const at::Tensor& master;
  const at::Tensor& max_exp_avg_sq;
  const double* scalars;  // the seat::kAdamWScalars of the step, as doubles
  bool maximize, stochastic, dense_state;
  uint32_t key;
};

// The AdamW math of n entries held in arrays (w: the weights, g: the gradients, m, v and
// vmax (amsgrad; null without) the state), updated in place: seat::adamw_step on each,
// which the scalar copy calls as it is. The vector copies run the same operations in
// the same order on 16 or 8 lanes (IEEE add, mul, div and sqrt round the same on every
// lane, and fp-contract=off keeps a * b + c two roundings, as in the scalar copy), so
// every copy gives the same bits.
template <typename T>
using AdamWLanes = void (*)(T* w, const T* g, T* m, T* v, T* vmax, int64_t n, const seat::AdamWScalars<T>& s,
                            bool maximize);

template <typename T>
void adamw_lanes_scalar(T* w, const T* g, T* m, T* v, T* vmax, int64_t n, const seat::AdamWScalars<T>& s,
                        bool maximize) {
  for (int64_t k = 0; k < n; ++k) {
    w[k] = seat::adamw_step<T>(w[k], g[k], m[k], v[k], vmax != nullptr ? vmax + k : nullptr, s, maximize);
  }
}

#ifdef SEAT_CPU_ISA_COPIES
// The vector copy, written once on W-lane GCC vector types and compiled per instruction
// set (AVX-512: W = 16, AVX2: W = 8) with fp-contract=off.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_sqrt_ps: see member_words.h
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq")
namespace avx512 {
#define SEAT_VEC_W 16
#include "adamw_vec.h"
#undef SEAT_VEC_W
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#define SEAT_VEC_W 8
#include "adamw_vec.h"
#undef SEAT_VEC_W
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// The copy for this process (float: by seat::cpu::cpu_isa(); double: scalar). Chosen on
// the calling thread before any parallel region (the first call may throw).
template <typename T>
AdamWLanes<T> adamw_lanes() {
  if constexpr (std::is_same<T, float>::value) {
    static const AdamWLanes<float> chosen = [] {
#ifdef SEAT_CPU_ISA_COPIES
      switch (seat::cpu::cpu_isa()) {
        case seat::cpu::Isa::kAvx512: return avx512::adamw_lanes;
        case seat::cpu::Isa::kAvx2: return avx2::adamw_lanes;
        case seat::cpu::Isa::kBaseline: break;
      }
#endif
      return adamw_lanes_scalar<float>;
    }();
    return chosen;
  }
  return adamw_lanes_scalar<T>;
}

// Entries per AdamW batch: the weights, gradients (and, with dense state, the state) of
// this many entries are gathered into arrays on the stack, stepped by adamw_lanes, and
// scattered back.
constexpr int64_t kAdamWBatch = 256;

template <typename ParamIO, typename T, typename G>
struct AdamWOp {
  typename ParamIO::storage* p;
  const G* g;
  T *m, *v, *w32, *vmax;
  seat::AdamWScalars<T> s;
  AdamWLanes<T> lanes;
  bool maximize, stochastic, dense_state;
  uint32_t key;

  std::pair<const char*, int64_t> lines() const {
    return {reinterpret_cast<const char*>(p), sizeof(typename ParamIO::storage)};
  }

  void operator()(const Run& r) const {
    alignas(64) T W[kAdamWBatch], Gr[kAdamWBatch], M[kAdamWBatch], V[kAdamWBatch], VM[kAdamWBatch];
    auto* param = p + r.base;
    for (int64_t c = 0; c < r.n; c += kAdamWBatch) {
      const int64_t n = std::min(kAdamWBatch, r.n - c);
      const int32_t* rel = r.rel + c;
      const int64_t slot = r.slot + c;
      const int64_t ahead = r.n + r.ahead - c;  // entries readable from rel[0] on
      for (int64_t k = 0; k < n; ++k) {
        if (k + kPrefetchAhead < ahead) __builtin_prefetch(param + rel[k + kPrefetchAhead], 1);
        const int64_t at = dense_state ? r.base + rel[k] : slot + k;
        W[k] = w32 != nullptr ? w32[at] : ParamIO::template load<T>(param + rel[k]);
        Gr[k] = seat::load_grad<T>(g + slot + k);
      }
      T *mk = m + slot, *vk = v + slot, *vmaxk = vmax != nullptr ? vmax + slot : nullptr;
      if (dense_state) {  // state at the entries' positions: through the arrays too
        for (int64_t k = 0; k < n; ++k) {
          const int64_t pos = r.base + rel[k];
          M[k] = m[pos];
          V[k] = v[pos];
          if (vmax != nullptr) VM[k] = vmax[pos];
        }
        mk = M;
        vk = V;
        vmaxk = vmax != nullptr ? VM : nullptr;
      }
      lanes(W, Gr, mk, vk, vmaxk, n, s, maximize);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t pos = r.base + rel[k];
        const int64_t at = dense_state ? pos : slot + k;
        if (dense_state) {
          m[pos] = M[k];
          v[pos] = V[k];
          if (vmax != nullptr) vmax[pos] = VM[k];
        }
        if (w32 != nullptr) w32[at] = W[k];
        ParamIO::store(param + rel[k], W[k], stochastic,
                       stochastic ? seat::mix32(key ^ seat::mix32(static_cast<uint32_t>(pos))) : 0u);
      }
    }
  }
};

template <typename P, typename ParamIO, typename T, typename G>
void adamw(const MaskRef& mask, const AdamWArgs& a) {
  T* w32 = seat::cpu::data_or_null<T>(a.master);
  // Stochastic rounding applies to bf16 params without a master only (the master holds
  // the exact weight); elsewhere it would only cost a hash.
  const bool stochastic = a.stochastic && w32 == nullptr && std::is_same<ParamIO, seat::BF16IO>::value;
  const AdamWOp<ParamIO, T, G> op{static_cast<typename ParamIO::storage*>(a.param.data_ptr()),
                                  static_cast<const G*>(a.grad.data_ptr()),
                                  a.exp_avg.data_ptr<T>(),
                                  a.exp_avg_sq.data_ptr<T>(),
                                  w32,
                                  seat::cpu::data_or_null<T>(a.max_exp_avg_sq),
                                  seat::adamw_scalars<T>(a.scalars),
                                  adamw_lanes<T>(),
                                  a.maximize,
                                  stochastic,
                                  a.dense_state,
                                  a.key};
  for_each_run<P>(mask, kAdamWGrain, op);
}

// Calls f(Tag<ParamIO>, Tag<T>, Tag<G>) for one parameter's dtypes: bf16 / fp16 / fp32
// params with fp32 state (T) and fp32 or bf16 grads (G: bf16 as uint16_t bits, upcast on
// load), fp64 params with fp64 state and grads.
template <typename F>
void dispatch_adamw_dtypes(const AdamWArgs& a, const char* who, F&& f) {
  const auto param = a.param.scalar_type(), grad = a.grad.scalar_type(), state = a.exp_avg.scalar_type();
  if (param == at::kDouble) {
    TORCH_CHECK(state == at::kDouble && grad == at::kDouble, who, ": fp64 params need float64 state and grads");
    return f(Tag<seat::PlainIO<double>>{}, Tag<double>{}, Tag<double>{});
  }
  TORCH_CHECK(state == at::kFloat, who, ": ", param, " params need float32 state");
  TORCH_CHECK(grad == at::kFloat || grad == at::kBFloat16, who, ": grads must be float32 or bfloat16");
  auto with_grad = [&](auto io) {
    if (grad == at::kBFloat16) return f(io, Tag<float>{}, Tag<uint16_t>{});
    return f(io, Tag<float>{}, Tag<float>{});
  };
  switch (param) {
    case at::kBFloat16: return with_grad(Tag<seat::BF16IO>{});
    case at::kHalf: return with_grad(Tag<seat::cpu::HalfIO>{});
    case at::kFloat: return with_grad(Tag<seat::PlainIO<float>>{});
    default: TORCH_CHECK(false, who, ": unsupported param dtype ", param);
  }
}

void check_state(const at::Tensor& t, int64_t n, bool optional, const char* name, size_t i, const char* who) {
  if (optional && t.numel() == 0) return;
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == n, who, ": ", name, "[", i,
              "] must be a contiguous CPU tensor of ", n, " entries; got ", t.numel());
}

void sparse_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList max_exp_avg_sqs,
                      int64_t encoding, at::TensorList mask_indices, at::TensorList mask_offsets,
                      at::IntArrayRef mask_ints, at::ArrayRef<double> scalars, bool maximize, bool stochastic,
                      int64_t step_key, bool dense_state) {
  constexpr const char* who = "sparse_adamw_ CPU kernel";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && masters.size() == n &&
                  max_exp_avg_sqs.size() == n && mask_indices.size() == n && mask_offsets.size() == n,
              who, ": every tensor list must have one entry per param");
  TORCH_CHECK(mask_ints.size() == seat::kMaskInts * n, who, ": mask_ints must hold ", seat::kMaskInts,
              " ints per param");
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, who, ": expected ", seat::kAdamWScalars, " scalars");
  dispatch_encoding(encoding, who, [&](auto policy) {
    using P = decltype(policy);
    for (size_t i = 0; i < n; ++i) {
      const int64_t nnz = grads[i].numel();
      if (nnz == 0) continue;
      check_dense(params[i], "params", who);
      check_state(grads[i], nnz, false, "grads", i, who);
      const int64_t state_n = dense_state ? params[i].numel() : nnz;
      check_state(exp_avgs[i], state_n, false, "exp_avgs", i, who);
      check_state(exp_avg_sqs[i], state_n, false, "exp_avg_sqs", i, who);
      check_state(masters[i], state_n, true, "masters", i, who);
      check_state(max_exp_avg_sqs[i], state_n, true, "max_exp_avg_sqs", i, who);
      const MaskRef mask = mask_ref(policy, mask_indices[i], mask_offsets[i],
                                    mask_ints.slice(seat::kMaskInts * i, seat::kMaskInts), params[i].numel(), nnz,
                                    who);
      const AdamWArgs a{params[i],     grads[i],   exp_avgs[i], exp_avg_sqs[i],
                        masters[i],    max_exp_avg_sqs[i], scalars.data(), maximize, stochastic, dense_state,
                        seat::tensor_key(static_cast<uint32_t>(step_key), static_cast<uint32_t>(i))};
      dispatch_adamw_dtypes(a, who, [&](auto io, auto t, auto g) {
        adamw<P, typename decltype(io)::type, typename decltype(t)::type, typename decltype(g)::type>(mask, a);
      });
    }
  });
}

// ----------------------------------------------------------------------------- hash counts

void implicit_block_counts_cpu(at::Tensor counts, int64_t numel, int64_t key, int64_t threshold, int64_t block) {
  constexpr const char* who = "implicit_block_counts_ CPU kernel";
  check_hash(numel, key, threshold, block, who);
  const int64_t n_blocks = seat::n_blocks_of(numel, block);
  check_mask_tensor(counts, at::kInt, n_blocks, "counts (ceil(numel / block) entries)", who);
  int32_t* out = counts.data_ptr<int32_t>();
  const MemberWords member_words_fn = member_words();
#pragma omp parallel if (n_blocks > kParallelBlocks) num_threads(at::get_num_threads())
  {
    std::vector<uint32_t> words(static_cast<size_t>(words_of(block)));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t begin = b * block, len = std::min(block, numel - begin);
      member_words_fn(static_cast<uint32_t>(key), begin, len, threshold, words.data());
      int32_t c = 0;
      for (int64_t w = 0; w < words_of(len); ++w) c += __builtin_popcount(words[w]);
      out[b] = c;
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) {
  m.impl("masked_gather_", &masked_gather_cpu);
  m.impl("masked_swap_", &masked_swap_cpu);
  m.impl("sparse_adamw_", &sparse_adamw_cpu);
  m.impl("implicit_block_counts_", &implicit_block_counts_cpu);
}
