// CPU kernels of masked_gather_ and masked_swap_ (OpenMP over the nnz entries).
// Inputs were validated by python/seat/ops; the TORCH_CHECKs here guard direct callers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "masked_entries.h"
#include "seat/common.h"

namespace {

// Below this many entries a parallel region costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;
constexpr int64_t kPrefetchAhead = 16;

void check_common(const at::Tensor& target, const at::Tensor& idx, const at::Tensor& compact) {
  TORCH_CHECK(target.device().is_cpu() && idx.device().is_cpu() && compact.device().is_cpu(),
              "seat_C CPU kernel: all tensors must be on the CPU");
  TORCH_CHECK(target.is_contiguous() && idx.is_contiguous() && compact.is_contiguous(),
              "seat_C CPU kernel: all tensors must be contiguous");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1, "seat_C CPU kernel: idx must be 1-D int32");
  TORCH_CHECK(compact.dim() == 1 && compact.numel() == idx.numel(),
              "seat_C CPU kernel: the compact tensor must be 1-D with idx.numel() entries");
}

template <typename Acc, typename In>
void gather_loop(Acc* out, const In* dense, const int32_t* idx, int64_t nnz) {
#pragma omp parallel for schedule(static) if (nnz > kParallelGrain) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < nnz; ++i) {
    // scattered reads: ask for lines a few entries ahead
    if (i + kPrefetchAhead < nnz) __builtin_prefetch(dense + idx[i + kPrefetchAhead], 0);
    seat::gather_accumulate<Acc>(out, i, static_cast<Acc>(dense[idx[i]]));
  }
}

// bf16 compact gradient (the lean mode): the sum is formed in fp32 and rounded once to
// nearest-even bf16, so a single gather into a zeroed buffer is the bf16 rounding of the
// gradient; accumulating further micro-batches rounds again each time.
template <typename In>
void gather_loop_bf16(c10::BFloat16* out, const In* dense, const int32_t* idx, int64_t nnz) {
#pragma omp parallel for schedule(static) if (nnz > kParallelGrain) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < nnz; ++i) {
    if (i + kPrefetchAhead < nnz) __builtin_prefetch(dense + idx[i + kPrefetchAhead], 0);
    out[i] = c10::BFloat16(static_cast<float>(out[i]) + static_cast<float>(dense[idx[i]]));
  }
}

void masked_gather_cpu(at::Tensor out, const at::Tensor& dense, const at::Tensor& idx) {
  check_common(dense, idx, out);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble ||
                  out.scalar_type() == at::kBFloat16,
              "masked_gather_ CPU kernel: out must be float32, float64 or bfloat16");
  const int64_t nnz = idx.numel();
  if (nnz == 0) return;
  const int32_t* idx_ptr = idx.data_ptr<int32_t>();
  if (out.scalar_type() == at::kBFloat16) {
    c10::BFloat16* out_ptr = out.data_ptr<c10::BFloat16>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "masked_gather_cpu_bf16", [&] {
      gather_loop_bf16<scalar_t>(out_ptr, dense.data_ptr<scalar_t>(), idx_ptr, nnz);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_gather_cpu_out", [&] {
    using acc_t = scalar_t;
    acc_t* out_ptr = out.data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "masked_gather_cpu_in", [&] {
      gather_loop<acc_t, scalar_t>(out_ptr, dense.data_ptr<scalar_t>(), idx_ptr, nnz);
    });
  });
}

// f(idx[i], i) for every entry, in parallel.
template <typename F>
void for_each_index(const int32_t* idx, int64_t nnz, F f) {
#pragma omp parallel for schedule(static) if (nnz > kParallelGrain) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < nnz; ++i) f(static_cast<int64_t>(idx[i]), i);
}

void masked_swap_cpu(at::Tensor param, const at::Tensor& idx, at::Tensor values) {
  check_common(param, idx, values);
  TORCH_CHECK(param.scalar_type() == values.scalar_type(), "masked_swap_ CPU kernel: values must have param's dtype");
  const int64_t nnz = idx.numel();
  if (nnz == 0) return;
  const int32_t* idx_ptr = idx.data_ptr<int32_t>();
  seat::cpu::swap_by_width([&](auto f) { for_each_index(idx_ptr, nnz, f); }, param, values, "masked_swap_ CPU kernel");
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) {
  m.impl("masked_gather_", &masked_gather_cpu);
  m.impl("masked_swap_", &masked_swap_cpu);
}
