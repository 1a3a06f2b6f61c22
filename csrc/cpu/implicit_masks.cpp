// CPU kernels of the implicit-mask ops (masked_gather_implicit_, masked_swap_implicit_,
// sparse_adamw_implicit_, implicit_block_counts_): OpenMP over the mask's blocks; inside a
// block the members are recomputed in order and numbered from the block's first slot
// (seat/implicit_mask.h). Inputs were validated by python/seat/ops; the TORCH_CHECKs
// here guard direct callers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "seat/adamw.h"
#include "seat/implicit_mask.h"
#include "masked_entries.h"

namespace {

// Blocks per parallel region below which threads cost more than they save (a block is
// a few thousand hashes).
constexpr int64_t kParallelBlocks = 8;

seat::ImplicitMaskRef mask_ref(const at::Tensor& block_offsets, int64_t numel, int64_t key, int64_t threshold,
                               int64_t block, const char* who) {
  TORCH_CHECK(block > 0, who, ": block must be > 0");
  TORCH_CHECK(block_offsets.device().is_cpu() && block_offsets.is_contiguous() &&
                  block_offsets.scalar_type() == at::kInt && block_offsets.dim() == 1 &&
                  block_offsets.numel() == seat::implicit_n_blocks(numel, block) + 1,
              who, ": block_offsets must be a contiguous int32 CPU tensor of ceil(numel / block) + 1 entries");
  return {block_offsets.data_ptr<int32_t>(), numel, block, threshold, static_cast<uint32_t>(key)};
}

// flags[k] = membership of element begin + k, for k < len. A branch-free loop the
// compiler vectorizes; cloned for AVX2 (32-bit lane multiplies) with a baseline fallback,
// picked at load time, since the hash of every element is what bounds these kernels.
__attribute__((target_clones("avx2", "default"))) void member_flags(uint32_t key, int64_t begin, int64_t len,
                                                                    int64_t threshold, uint8_t* flags) {
  const bool all = threshold > static_cast<int64_t>(UINT32_MAX);  // density 1
  const uint32_t below = all ? 0u : static_cast<uint32_t>(threshold);
  for (int64_t k = 0; k < len; ++k) {
    flags[k] = static_cast<uint8_t>(all | (seat::mix32(key ^ seat::mix32(static_cast<uint32_t>(begin + k))) < below));
  }
}

// Run f(e, slot) on every member of the mask, blocks in parallel: per block, the flags
// first (vectorized), then the members in order, skipping 8 flags at a time where none is
// set (most of them at low density). Same members and slots as
// seat::for_each_member_in_block, including its bound on the block's slots.
template <typename F>
void for_each_member(const seat::ImplicitMaskRef& m, F f) {
  const int64_t n_blocks = seat::implicit_n_blocks(m.numel, m.block);
#pragma omp parallel if (n_blocks > kParallelBlocks) num_threads(at::get_num_threads())
  {
    std::vector<uint8_t> flags(static_cast<size_t>(m.block) + 8, 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t begin = b * m.block;
      const int64_t len = std::min(m.block, m.numel - begin);
      member_flags(m.key, begin, len, m.threshold, flags.data());
      std::fill(flags.begin() + len, flags.begin() + ((len + 7) & ~int64_t{7}), uint8_t{0});
      int64_t slot = m.block_offsets[b];
      const int64_t limit = m.block_offsets[b + 1];
      for (int64_t k = 0; k < len && slot < limit; k += 8) {
        uint64_t word;
        std::memcpy(&word, flags.data() + k, sizeof(word));
        if (word == 0) continue;
        for (int64_t q = k; q < k + 8 && q < len && slot < limit; ++q) {
          if (flags[q]) f(begin + q, slot++);
        }
      }
    }
  }
}

void implicit_block_counts_cpu(at::Tensor counts, int64_t numel, int64_t key, int64_t threshold, int64_t block) {
  TORCH_CHECK(block > 0, "implicit_block_counts_ CPU kernel: block must be > 0");
  const int64_t n_blocks = seat::implicit_n_blocks(numel, block);
  TORCH_CHECK(counts.device().is_cpu() && counts.is_contiguous() && counts.scalar_type() == at::kInt &&
                  counts.numel() == n_blocks,
              "implicit_block_counts_ CPU kernel: counts must be a contiguous int32 CPU tensor of n_blocks entries");
  int32_t* out = counts.data_ptr<int32_t>();
#pragma omp parallel if (n_blocks > kParallelBlocks) num_threads(at::get_num_threads())
  {
    std::vector<uint8_t> flags(static_cast<size_t>(block));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t begin = b * block, len = std::min(block, numel - begin);
      member_flags(static_cast<uint32_t>(key), begin, len, threshold, flags.data());
      int32_t c = 0;
      for (int64_t q = 0; q < len; ++q) c += flags[q];
      out[b] = c;
    }
  }
}

void masked_gather_implicit_cpu(at::Tensor out, const at::Tensor& dense, const at::Tensor& block_offsets,
                                int64_t key, int64_t threshold, int64_t block) {
  TORCH_CHECK(out.device().is_cpu() && dense.device().is_cpu() && out.is_contiguous() && dense.is_contiguous(),
              "masked_gather_implicit_ CPU kernel: out and dense must be contiguous CPU tensors");
  const auto m = mask_ref(block_offsets, dense.numel(), key, threshold, block, "masked_gather_implicit_ CPU kernel");
  TORCH_CHECK(out.dim() == 1 && out.numel() == block_offsets[-1].item<int32_t>(),
              "masked_gather_implicit_ CPU kernel: out must have block_offsets[-1] entries");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_gather_implicit_cpu_out", [&] {
    using acc_t = scalar_t;
    acc_t* o = out.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "masked_gather_implicit_cpu_in",
                                    [&] {
      const scalar_t* d = dense.data_ptr<scalar_t>();
      for_each_member(m, [&](int64_t e, int64_t slot) {
        seat::gather_accumulate<acc_t>(o, slot, static_cast<acc_t>(d[e]));
      });
    });
  });
}

void masked_swap_implicit_cpu(at::Tensor param, const at::Tensor& block_offsets, at::Tensor values, int64_t key,
                              int64_t threshold, int64_t block) {
  TORCH_CHECK(param.device().is_cpu() && values.device().is_cpu() && param.is_contiguous() && values.is_contiguous(),
              "masked_swap_implicit_ CPU kernel: param and values must be contiguous CPU tensors");
  TORCH_CHECK(param.scalar_type() == values.scalar_type(),
              "masked_swap_implicit_ CPU kernel: values must have param's dtype");
  const auto m = mask_ref(block_offsets, param.numel(), key, threshold, block, "masked_swap_implicit_ CPU kernel");
  TORCH_CHECK(values.dim() == 1 && values.numel() == block_offsets[-1].item<int32_t>(),
              "masked_swap_implicit_ CPU kernel: values must have block_offsets[-1] entries");
  seat::cpu::swap_by_width([&](auto f) { for_each_member(m, f); }, param, values, "masked_swap_implicit_ CPU kernel");
}

void sparse_adamw_implicit_cpu(at::TensorList params, at::TensorList block_offsets, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList masters,
                               at::TensorList max_exp_avg_sqs, at::IntArrayRef keys, at::IntArrayRef thresholds,
                               at::IntArrayRef blocks, at::ArrayRef<double> scalars, bool maximize, bool stochastic,
                               int64_t step_key, bool dense_state) {
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, "sparse_adamw_implicit_ CPU kernel: expected 7 scalars");
  TORCH_CHECK(keys.size() == params.size() && thresholds.size() == params.size() && blocks.size() == params.size(),
              "sparse_adamw_implicit_ CPU kernel: one key, threshold and block per param");
  const auto s32 = seat::adamw_scalars<float>(scalars.data());
  const auto s64 = seat::adamw_scalars<double>(scalars.data());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.device().is_cpu() && param.is_contiguous(), "sparse_adamw_implicit_ CPU kernel: params[", i,
                "] must be a contiguous CPU tensor");
    if (grads[i].numel() == 0) continue;
    const auto mask = mask_ref(block_offsets[i], param.numel(), keys[i], thresholds[i], blocks[i],
                               "sparse_adamw_implicit_ CPU kernel");
    const uint32_t key = seat::tensor_key(static_cast<uint32_t>(step_key), static_cast<uint32_t>(i));
    seat::cpu::adamw_param([&](auto f) { for_each_member(mask, f); }, "sparse_adamw_implicit_ CPU kernel", param,
                           grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i], max_exp_avg_sqs[i], s32, s64, maximize,
                           stochastic, key, dense_state);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) {
  m.impl("implicit_block_counts_", &implicit_block_counts_cpu);
  m.impl("masked_gather_implicit_", &masked_gather_implicit_cpu);
  m.impl("masked_swap_implicit_", &masked_swap_implicit_cpu);
  m.impl("sparse_adamw_implicit_", &sparse_adamw_implicit_cpu);
}
