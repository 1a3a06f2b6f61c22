// CPU kernels of the sparse-update family (seat_C::masked_gather_, masked_swap_,
// sparse_adamw_, implicit_block_counts_) for every mask encoding. Each operation is
// written once over a mask policy P (seat/masks.h) and walks its entries with
// for_each_entry<P>; dispatch_encoding is the one place that turns the runtime `encoding`
// into a policy. Inputs were validated by python/seat/ops; the TORCH_CHECKs here guard
// direct callers, and the walks never yield a position or slot outside the tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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
// An index walk touches the parameter at scattered positions: it asks for the cache line
// of the entry this many entries ahead.
constexpr int64_t kPrefetchAhead = 16;
// A hash walk asks for the lines of the elements this many 32-element words ahead.
constexpr int64_t kWordsAhead = 8;

// ----------------------------------------------------------------------------- walks

using seat::cpu::member_words;
using seat::cpu::MemberWords;
using seat::cpu::words_of;

// Walk<P>::run(m, grain, f, prefetch) runs f(position, slot) on every entry of m, P's work
// items in parallel when m has more than `grain` entries; prefetch(position) is a hint
// for walks whose positions jump. The generic walk: P::visit per item, dynamically
// scheduled since items differ in size (block16: the entries of a 65536-element block,
// found from block_starts without a search).
//
// Every walk runs on per-thread copies of the mask and of the (by-value) callables: read
// through references, they would live on the calling thread's stack, whose cache lines
// that thread keeps writing while the others read them (measured: +30% on a hash gather
// with 2 threads).
template <typename P>
struct Walk {
  template <typename F, typename Prefetch>
  static void run(const MaskRef& mask, int64_t grain, const F& fn, const Prefetch&) {
#pragma omp parallel if (mask.nnz > grain) num_threads(at::get_num_threads())
    {
      const MaskRef m = mask;
      F f = fn;
      const int64_t items = P::work_items(m);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) P::visit(m, it, f);
    }
  }
};

// int32 indices: one entry per item, statically scheduled, with a software prefetch (the
// hardware prefetcher cannot guess the next index).
template <>
struct Walk<IndexMask> {
  template <typename F, typename Prefetch>
  static void run(const MaskRef& mask, int64_t grain, const F& fn, const Prefetch& pf) {
#pragma omp parallel if (mask.nnz > grain) num_threads(at::get_num_threads())
    {
      const MaskRef m = mask;
      F f = fn;
      Prefetch prefetch = pf;
      const int64_t nnz = m.nnz;
#pragma omp for schedule(static)
      for (int64_t j = 0; j < nnz; ++j) {
        if (j + kPrefetchAhead < nnz) prefetch(static_cast<int64_t>(m.index[j + kPrefetchAhead]));
        IndexMask::visit(m, j, f);
      }
    }
  }
};

// Every element: positions 0 .. nnz - 1 in order, statically scheduled (no index to read).
template <>
struct Walk<FullMask> {
  template <typename F, typename Prefetch>
  static void run(const MaskRef& mask, int64_t grain, const F& fn, const Prefetch&) {
#pragma omp parallel if (mask.nnz > grain) num_threads(at::get_num_threads())
    {
      const MaskRef m = mask;
      F f = fn;
      const int64_t n = m.nnz < m.numel ? m.nnz : m.numel;
#pragma omp for schedule(static)
      for (int64_t j = 0; j < n; ++j) f(j, j);
    }
  }
};

// Hash masks: per block, the membership bits first (member_words), then the members in
// order by bit scans (most words are 0 at low density). Same entries and bounds as
// HashMask::visit: slots from block_offsets[b], below the next block's first slot and
// nnz; a block with no slots is not hashed at all.
template <>
struct Walk<HashMask> {
  template <typename F, typename Prefetch>
  static void run(const MaskRef& mask, int64_t, const F& fn, const Prefetch& pf) {
    const MemberWords member_words_fn = member_words();
#pragma omp parallel if (mask.n_blocks > kParallelBlocks) num_threads(at::get_num_threads())
    {
      const MaskRef m = mask;
      F f = fn;
      Prefetch prefetch = pf;
      const int64_t n_blocks = m.n_blocks;
      std::vector<uint32_t> words(static_cast<size_t>(words_of(m.block)));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < n_blocks; ++b) {
        int64_t slot = m.index[b];
        const int64_t limit = std::min<int64_t>(m.index[b + 1], m.nnz);
        if (slot < 0 || slot >= limit) continue;
        const int64_t begin = b * m.block;
        const int64_t len = std::min(m.block, m.numel - begin);
        member_words_fn(m.key, begin, len, m.threshold, words.data());
        for (int64_t w = 0; w < words_of(len) && slot < limit; ++w) {
          // the members' cache lines a few words ahead (2 lines of fp32 per word): the
          // loads behind the bit scans otherwise wait on memory one line at a time
          const int64_t ahead = begin + (w + kWordsAhead) * 32;
          if (ahead < m.numel) prefetch(ahead);
          if (ahead + 16 < m.numel) prefetch(ahead + 16);
          for (uint32_t word = words[w]; word != 0 && slot < limit; word &= word - 1) {
            f(begin + w * 32 + __builtin_ctz(word), slot++);
          }
        }
      }
    }
  }
};

template <typename P, typename F, typename Prefetch>
void for_each_entry(const MaskRef& m, int64_t grain, const F& f, const Prefetch& prefetch) {
  Walk<P>::run(m, grain, f, prefetch);
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

template <typename P, typename Out, typename In>
void gather(const MaskRef& m, Out* out, const In* dense) {
  for_each_entry<P>(
      m, kMoveGrain, [=](int64_t pos, int64_t slot) { accumulate(out[slot], dense[pos]); },
      [=](int64_t pos) { __builtin_prefetch(dense + pos, 0); });
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

template <typename P, typename Bits>
void swap(const MaskRef& m, void* param, void* values) {
  Bits* p = static_cast<Bits*>(param);
  Bits* v = static_cast<Bits*>(values);
  for_each_entry<P>(
      m, kMoveGrain, [=](int64_t pos, int64_t slot) { seat::swap_bits<Bits>(p + pos, v + slot); },
      [=](int64_t pos) { __builtin_prefetch(p + pos, 1); });
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

template <typename P, typename ParamIO, typename T, typename G>
void adamw(const MaskRef& mask, const AdamWArgs& a) {
  const auto s = seat::adamw_scalars<T>(a.scalars);
  auto* p = static_cast<typename ParamIO::storage*>(a.param.data_ptr());
  const G* g = static_cast<const G*>(a.grad.data_ptr());
  T* m = a.exp_avg.data_ptr<T>();
  T* v = a.exp_avg_sq.data_ptr<T>();
  T* w32 = seat::cpu::data_or_null<T>(a.master);
  T* vmax = seat::cpu::data_or_null<T>(a.max_exp_avg_sq);
  // Stochastic rounding applies to bf16 params only; elsewhere it would only cost a hash.
  const bool stochastic = a.stochastic && std::is_same<ParamIO, seat::BF16IO>::value;
  const bool maximize = a.maximize, dense_state = a.dense_state;
  const uint32_t key = a.key;
  for_each_entry<P>(
      mask, kAdamWGrain,
      [=](int64_t pos, int64_t slot) {
        seat::sparse_adamw_entry<ParamIO, T, G>(p, pos, g, m, v, w32, vmax, slot, s, maximize, stochastic, key,
                                                dense_state);
      },
      [=](int64_t pos) { __builtin_prefetch(p + pos, 1); });
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
