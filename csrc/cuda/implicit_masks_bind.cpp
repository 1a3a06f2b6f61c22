// torch side of the implicit-mask CUDA kernels: unpack tensors, pick the current stream
// and device, call the launchers in implicit_masks.cu (sparse_adamw_implicit_: group by
// dtypes, one pointer table per group copied to the device, one launch per group).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "implicit_masks.cuh"
#include "seat/adamw.h"
#include "torch_dtype.h"

namespace {

constexpr int64_t kMaxTensorsPerLaunch = 65535;

seat::ImplicitMaskRef mask_ref(const at::Tensor& target, const at::Tensor& block_offsets, int64_t key,
                               int64_t threshold, int64_t block, const char* who) {
  TORCH_CHECK(block > 0 && block % 256 == 0, who, ": block must be a positive multiple of 256");
  TORCH_CHECK(target.is_cuda() && block_offsets.device() == target.device() && block_offsets.is_contiguous() &&
                  block_offsets.scalar_type() == at::kInt && block_offsets.dim() == 1 &&
                  block_offsets.numel() == seat::implicit_n_blocks(target.numel(), block) + 1,
              who, ": block_offsets must be a contiguous int32 tensor of ceil(numel / block) + 1 entries on the "
              "param's CUDA device");
  return {block_offsets.data_ptr<int32_t>(), target.numel(), block, threshold, static_cast<uint32_t>(key)};
}

void implicit_block_counts_cuda(at::Tensor counts, int64_t numel, int64_t key, int64_t threshold, int64_t block) {
  TORCH_CHECK(counts.is_cuda() && counts.is_contiguous() && counts.scalar_type() == at::kInt && block > 0 &&
                  counts.numel() == seat::implicit_n_blocks(numel, block),
              "implicit_block_counts_ CUDA kernel: counts must be a contiguous int32 CUDA tensor of n_blocks entries");
  const c10::cuda::CUDAGuard guard(counts.device());
  const cudaError_t err = seat::cuda::implicit_block_counts(counts.data_ptr<int32_t>(), numel,
                                                            static_cast<uint32_t>(key), threshold, block,
                                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "implicit_block_counts_ CUDA kernel failed: ", cudaGetErrorString(err));
}

void masked_gather_implicit_cuda(at::Tensor out, const at::Tensor& dense, const at::Tensor& block_offsets,
                                 int64_t key, int64_t threshold, int64_t block) {
  const auto m = mask_ref(dense, block_offsets, key, threshold, block, "masked_gather_implicit_ CUDA kernel");
  TORCH_CHECK(out.device() == dense.device() && out.is_contiguous() && dense.is_contiguous() && out.dim() == 1,
              "masked_gather_implicit_ CUDA kernel: out (1-D) and dense must be contiguous on one device");
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaError_t err = seat::cuda::masked_gather_implicit(
      out.data_ptr(), seat::to_seat_dtype(out.scalar_type(), "masked_gather_implicit_ CUDA kernel"), dense.data_ptr(),
      seat::to_seat_dtype(dense.scalar_type(), "masked_gather_implicit_ CUDA kernel"), m,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masked_gather_implicit_ CUDA kernel failed: ", cudaGetErrorString(err));
}

void masked_swap_implicit_cuda(at::Tensor param, const at::Tensor& block_offsets, at::Tensor values, int64_t key,
                               int64_t threshold, int64_t block) {
  const auto m = mask_ref(param, block_offsets, key, threshold, block, "masked_swap_implicit_ CUDA kernel");
  TORCH_CHECK(values.device() == param.device() && values.is_contiguous() && param.is_contiguous() &&
                  values.scalar_type() == param.scalar_type() && values.dim() == 1,
              "masked_swap_implicit_ CUDA kernel: values (1-D, param's dtype) and param must be contiguous on one "
              "device");
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaError_t err = seat::cuda::masked_swap_implicit(param.data_ptr(), values.data_ptr(), param.element_size(),
                                                           m, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masked_swap_implicit_ CUDA kernel failed: ", cudaGetErrorString(err));
}

void* ptr_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

void sparse_adamw_implicit_cuda(at::TensorList params, at::TensorList block_offsets, at::TensorList grads,
                                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList masters,
                                at::TensorList max_exp_avg_sqs, at::IntArrayRef keys, at::IntArrayRef thresholds,
                                at::IntArrayRef blocks, at::ArrayRef<double> scalars, bool maximize, bool stochastic,
                                int64_t step_key, bool dense_state) {
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, "sparse_adamw_implicit_ CUDA kernel: expected 7 scalars");
  TORCH_CHECK(keys.size() == params.size() && thresholds.size() == params.size() && blocks.size() == params.size(),
              "sparse_adamw_implicit_ CUDA kernel: one key, threshold and block per param");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::map<std::tuple<int, int, int>, std::vector<seat::cuda::ImplicitAdamWTensorRef>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_cuda() && params[i].device() == device && params[i].is_contiguous(),
                "sparse_adamw_implicit_ CUDA kernel: params[", i, "] must be contiguous on ", device);
    if (grads[i].numel() == 0) continue;
    const auto m = mask_ref(params[i], block_offsets[i], keys[i], thresholds[i], blocks[i],
                            "sparse_adamw_implicit_ CUDA kernel");
    const auto key =
        std::make_tuple(static_cast<int>(params[i].scalar_type()), static_cast<int>(exp_avgs[i].scalar_type()),
                        static_cast<int>(grads[i].scalar_type()));
    groups[key].push_back({params[i].data_ptr(), m.block_offsets, grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                           exp_avg_sqs[i].data_ptr(), ptr_or_null(masters[i]), ptr_or_null(max_exp_avg_sqs[i]),
                           params[i].numel(), static_cast<int64_t>(i), thresholds[i], blocks[i], m.key});
  }
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  for (const auto& [dtypes, refs] : groups) {
    for (size_t first = 0; first < refs.size(); first += kMaxTensorsPerLaunch) {
      const int64_t n = std::min<int64_t>(kMaxTensorsPerLaunch, refs.size() - first);
      const int64_t bytes = n * static_cast<int64_t>(sizeof(seat::cuda::ImplicitAdamWTensorRef));
      at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(host.data_ptr(), refs.data() + first, bytes);
      at::Tensor table = host.to(device, /*non_blocking=*/true);
      int64_t max_blocks = 0;
      for (int64_t j = 0; j < n; ++j) {
        max_blocks = std::max(max_blocks, seat::implicit_n_blocks(refs[first + j].numel, refs[first + j].block));
      }
      const cudaError_t err = seat::cuda::sparse_adamw_implicit(
          static_cast<const seat::cuda::ImplicitAdamWTensorRef*>(table.data_ptr()), n, max_blocks,
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<0>(dtypes)), "sparse_adamw_implicit_ CUDA kernel"),
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<1>(dtypes)), "sparse_adamw_implicit_ CUDA kernel"),
          scalars.data(), maximize, stochastic, static_cast<uint32_t>(step_key), dense_state, stream,
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<2>(dtypes)), "sparse_adamw_implicit_ CUDA kernel"));
      TORCH_CHECK(err == cudaSuccess, "sparse_adamw_implicit_ CUDA kernel failed: ", cudaGetErrorString(err));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CUDA, m) {
  m.impl("implicit_block_counts_", &implicit_block_counts_cuda);
  m.impl("masked_gather_implicit_", &masked_gather_implicit_cuda);
  m.impl("masked_swap_implicit_", &masked_swap_implicit_cuda);
  m.impl("sparse_adamw_implicit_", &sparse_adamw_implicit_cuda);
}
