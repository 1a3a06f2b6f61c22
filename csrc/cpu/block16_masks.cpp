// CPU kernels of the block16-mask ops (masked_gather_block16_, masked_swap_block16_,
// sparse_adamw_block16_): OpenMP over the mask's blocks of 65536 elements; the entries of
// block b are block_starts[b] .. block_starts[b + 1] - 1 and sit at b * 65536 + offsets[j]
// (seat/block16.h). Inputs were validated by python/seat/ops; the TORCH_CHECKs here guard
// direct callers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "seat/adamw.h"
#include "seat/block16.h"
#include "masked_entries.h"

namespace {

// Entries per parallel region below which threads cost more than they save.
constexpr int64_t kParallelGrain = 1 << 15;

struct Block16Ref {
  const int32_t* starts;
  const uint16_t* offsets;
  int64_t n_blocks;
  int64_t nnz;
};

Block16Ref block16_ref(const at::Tensor& block_starts, const at::Tensor& offsets, int64_t numel, const char* who) {
  const int64_t n_blocks = seat::block16_n_blocks(numel);
  TORCH_CHECK(block_starts.device().is_cpu() && block_starts.is_contiguous() &&
                  block_starts.scalar_type() == at::kInt && block_starts.dim() == 1 &&
                  block_starts.numel() == n_blocks + 1,
              who, ": block_starts must be a contiguous int32 CPU tensor of ceil(numel / 65536) + 1 entries");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.is_contiguous() && offsets.scalar_type() == at::kUInt16 &&
                  offsets.dim() == 1,
              who, ": offsets must be a contiguous 1-D uint16 CPU tensor");
  return {block_starts.data_ptr<int32_t>(), static_cast<const uint16_t*>(offsets.data_ptr()), n_blocks,
          offsets.numel()};
}

// f(position, slot) for every entry, blocks in parallel.
template <typename F>
void for_each_entry(const Block16Ref& m, F f) {
#pragma omp parallel for schedule(dynamic, 1) if (m.nnz > kParallelGrain) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < m.n_blocks; ++b) {
    const int64_t base = b * seat::kBlock16;
    for (int64_t j = m.starts[b]; j < m.starts[b + 1]; ++j) f(base + m.offsets[j], j);
  }
}

void masked_gather_block16_cpu(at::Tensor out, const at::Tensor& dense, const at::Tensor& block_starts,
                               const at::Tensor& offsets) {
  TORCH_CHECK(out.device().is_cpu() && dense.device().is_cpu() && out.is_contiguous() && dense.is_contiguous(),
              "masked_gather_block16_ CPU kernel: out and dense must be contiguous CPU tensors");
  const auto m = block16_ref(block_starts, offsets, dense.numel(), "masked_gather_block16_ CPU kernel");
  TORCH_CHECK(out.dim() == 1 && out.numel() == m.nnz, "masked_gather_block16_ CPU kernel: out must have one entry "
              "per offset");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_gather_block16_cpu_out", [&] {
    using acc_t = scalar_t;
    acc_t* o = out.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "masked_gather_block16_cpu_in",
                                    [&] {
      const scalar_t* d = dense.data_ptr<scalar_t>();
      for_each_entry(m, [&](int64_t pos, int64_t j) {
        seat::gather_accumulate<acc_t>(o, j, static_cast<acc_t>(d[pos]));
      });
    });
  });
}

void masked_swap_block16_cpu(at::Tensor param, const at::Tensor& block_starts, const at::Tensor& offsets,
                             at::Tensor values) {
  TORCH_CHECK(param.device().is_cpu() && values.device().is_cpu() && param.is_contiguous() && values.is_contiguous(),
              "masked_swap_block16_ CPU kernel: param and values must be contiguous CPU tensors");
  TORCH_CHECK(param.scalar_type() == values.scalar_type(),
              "masked_swap_block16_ CPU kernel: values must have param's dtype");
  const auto m = block16_ref(block_starts, offsets, param.numel(), "masked_swap_block16_ CPU kernel");
  TORCH_CHECK(values.dim() == 1 && values.numel() == m.nnz,
              "masked_swap_block16_ CPU kernel: values must have one entry per offset");
  seat::cpu::swap_by_width([&](auto f) { for_each_entry(m, f); }, param, values, "masked_swap_block16_ CPU kernel");
}

void sparse_adamw_block16_cpu(at::TensorList params, at::TensorList block_starts, at::TensorList offsets,
                              at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              at::TensorList masters, at::TensorList max_exp_avg_sqs, at::ArrayRef<double> scalars,
                              bool maximize, bool stochastic, int64_t step_key, bool dense_state) {
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, "sparse_adamw_block16_ CPU kernel: expected 7 scalars");
  const auto s32 = seat::adamw_scalars<float>(scalars.data());
  const auto s64 = seat::adamw_scalars<double>(scalars.data());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.device().is_cpu() && param.is_contiguous(), "sparse_adamw_block16_ CPU kernel: params[", i,
                "] must be a contiguous CPU tensor");
    if (offsets[i].numel() == 0) continue;
    const auto mask = block16_ref(block_starts[i], offsets[i], param.numel(), "sparse_adamw_block16_ CPU kernel");
    const uint32_t key = seat::tensor_key(static_cast<uint32_t>(step_key), static_cast<uint32_t>(i));
    seat::cpu::adamw_param([&](auto f) { for_each_entry(mask, f); }, "sparse_adamw_block16_ CPU kernel", param,
                           grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i], max_exp_avg_sqs[i], s32, s64, maximize,
                           stochastic, key, dense_state);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) {
  m.impl("masked_gather_block16_", &masked_gather_block16_cpu);
  m.impl("masked_swap_block16_", &masked_swap_block16_cpu);
  m.impl("sparse_adamw_block16_", &sparse_adamw_block16_cpu);
}
