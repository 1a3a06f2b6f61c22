// torch side of the block16-mask CUDA kernels: unpack tensors, pick the current stream
// and device, call the launchers in block16_masks.cu (sparse_adamw_block16_: group by
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

#include "block16_masks.cuh"
#include "seat/adamw.h"
#include "torch_dtype.h"

namespace {

constexpr int64_t kMaxTensorsPerLaunch = 65535;

seat::cuda::Block16Ref block16_ref(const at::Tensor& target, const at::Tensor& block_starts, const at::Tensor& offsets,
                                   const char* who) {
  const int64_t n_blocks = seat::block16_n_blocks(target.numel());
  TORCH_CHECK(target.is_cuda() && block_starts.device() == target.device() && offsets.device() == target.device(),
              who, ": all tensors must be on one CUDA device");
  TORCH_CHECK(block_starts.is_contiguous() && block_starts.scalar_type() == at::kInt && block_starts.dim() == 1 &&
                  block_starts.numel() == n_blocks + 1,
              who, ": block_starts must be a contiguous int32 tensor of ceil(numel / 65536) + 1 entries");
  TORCH_CHECK(offsets.is_contiguous() && offsets.scalar_type() == at::kUInt16 && offsets.dim() == 1,
              who, ": offsets must be a contiguous 1-D uint16 tensor");
  return {block_starts.data_ptr<int32_t>(), static_cast<const uint16_t*>(offsets.data_ptr()), n_blocks,
          offsets.numel()};
}

void masked_gather_block16_cuda(at::Tensor out, const at::Tensor& dense, const at::Tensor& block_starts,
                                const at::Tensor& offsets) {
  const auto m = block16_ref(dense, block_starts, offsets, "masked_gather_block16_ CUDA kernel");
  TORCH_CHECK(out.device() == dense.device() && out.is_contiguous() && dense.is_contiguous() && out.dim() == 1 &&
                  out.numel() == m.nnz,
              "masked_gather_block16_ CUDA kernel: out (one entry per offset) and dense must be contiguous on one "
              "device");
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaError_t err = seat::cuda::masked_gather_block16(
      out.data_ptr(), seat::to_seat_dtype(out.scalar_type(), "masked_gather_block16_ CUDA kernel"), dense.data_ptr(),
      seat::to_seat_dtype(dense.scalar_type(), "masked_gather_block16_ CUDA kernel"), m,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masked_gather_block16_ CUDA kernel failed: ", cudaGetErrorString(err));
}

void masked_swap_block16_cuda(at::Tensor param, const at::Tensor& block_starts, const at::Tensor& offsets,
                              at::Tensor values) {
  const auto m = block16_ref(param, block_starts, offsets, "masked_swap_block16_ CUDA kernel");
  TORCH_CHECK(values.device() == param.device() && values.is_contiguous() && param.is_contiguous() &&
                  values.scalar_type() == param.scalar_type() && values.dim() == 1 && values.numel() == m.nnz,
              "masked_swap_block16_ CUDA kernel: values (one per offset, param's dtype) and param must be contiguous "
              "on one device");
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaError_t err = seat::cuda::masked_swap_block16(param.data_ptr(), values.data_ptr(), param.element_size(), m,
                                                          c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masked_swap_block16_ CUDA kernel failed: ", cudaGetErrorString(err));
}

void* ptr_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

void sparse_adamw_block16_cuda(at::TensorList params, at::TensorList block_starts, at::TensorList offsets,
                               at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                               at::TensorList masters, at::TensorList max_exp_avg_sqs, at::ArrayRef<double> scalars,
                               bool maximize, bool stochastic, int64_t step_key, bool dense_state) {
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, "sparse_adamw_block16_ CUDA kernel: expected 7 scalars");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::map<std::tuple<int, int, int>, std::vector<seat::cuda::Block16AdamWTensorRef>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_cuda() && params[i].device() == device && params[i].is_contiguous(),
                "sparse_adamw_block16_ CUDA kernel: params[", i, "] must be contiguous on ", device);
    if (offsets[i].numel() == 0) continue;
    const auto m = block16_ref(params[i], block_starts[i], offsets[i], "sparse_adamw_block16_ CUDA kernel");
    const auto key =
        std::make_tuple(static_cast<int>(params[i].scalar_type()), static_cast<int>(exp_avgs[i].scalar_type()),
                        static_cast<int>(grads[i].scalar_type()));
    groups[key].push_back({params[i].data_ptr(), m.block_starts, m.offsets, grads[i].data_ptr(),
                           exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), ptr_or_null(masters[i]),
                           ptr_or_null(max_exp_avg_sqs[i]), m.n_blocks, m.nnz, static_cast<int64_t>(i)});
  }
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  for (const auto& [dtypes, refs] : groups) {
    for (size_t first = 0; first < refs.size(); first += kMaxTensorsPerLaunch) {
      const int64_t n = std::min<int64_t>(kMaxTensorsPerLaunch, refs.size() - first);
      const int64_t bytes = n * static_cast<int64_t>(sizeof(seat::cuda::Block16AdamWTensorRef));
      at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(host.data_ptr(), refs.data() + first, bytes);
      at::Tensor table = host.to(device, /*non_blocking=*/true);
      int64_t max_nnz = 0;
      for (int64_t j = 0; j < n; ++j) max_nnz = std::max(max_nnz, refs[first + j].nnz);
      const cudaError_t err = seat::cuda::sparse_adamw_block16(
          static_cast<const seat::cuda::Block16AdamWTensorRef*>(table.data_ptr()), n, max_nnz,
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<0>(dtypes)), "sparse_adamw_block16_ CUDA kernel"),
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<1>(dtypes)), "sparse_adamw_block16_ CUDA kernel"),
          scalars.data(), maximize, stochastic, static_cast<uint32_t>(step_key), dense_state, stream,
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<2>(dtypes)), "sparse_adamw_block16_ CUDA kernel"));
      TORCH_CHECK(err == cudaSuccess, "sparse_adamw_block16_ CUDA kernel failed: ", cudaGetErrorString(err));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CUDA, m) {
  m.impl("masked_gather_block16_", &masked_gather_block16_cuda);
  m.impl("masked_swap_block16_", &masked_swap_block16_cuda);
  m.impl("sparse_adamw_block16_", &sparse_adamw_block16_cuda);
}
