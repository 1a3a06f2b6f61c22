// torch side of the sparse_adamw_ CUDA kernel: group the tensors by (param dtype, state
// dtype, grad dtype), build each group's pointer table in pinned memory, copy it to the device on
// the current stream and launch once per group.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "seat/adamw.h"
#include "sparse_adamw.cuh"
#include "torch_dtype.h"

namespace {

void* ptr_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

constexpr int64_t kMaxTensorsPerLaunch = 65535;

void sparse_adamw_cuda(at::TensorList params, at::TensorList idxs, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList masters, at::TensorList max_exp_avg_sqs,
                       at::ArrayRef<double> scalars, bool maximize, bool stochastic, int64_t step_key,
                       bool dense_state) {
  TORCH_CHECK(scalars.size() == seat::kAdamWScalars, "sparse_adamw_ CUDA kernel: expected 7 scalars");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::map<std::tuple<int, int, int>, std::vector<seat::cuda::AdamWTensorRef>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_cuda() && params[i].device() == device && params[i].is_contiguous(),
                "sparse_adamw_ CUDA kernel: params[", i, "] must be contiguous on ", device);
    if (idxs[i].numel() == 0) continue;
    const auto key = std::make_tuple(static_cast<int>(params[i].scalar_type()),
                                     static_cast<int>(exp_avgs[i].scalar_type()),
                                     static_cast<int>(grads[i].scalar_type()));
    groups[key].push_back({params[i].data_ptr(), idxs[i].data_ptr<int32_t>(), grads[i].data_ptr(),
                           exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), ptr_or_null(masters[i]),
                           ptr_or_null(max_exp_avg_sqs[i]), idxs[i].numel(), static_cast<int64_t>(i)});
  }
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  for (const auto& [dtypes, refs] : groups) {
    for (size_t first = 0; first < refs.size(); first += kMaxTensorsPerLaunch) {
      const int64_t n = std::min<int64_t>(kMaxTensorsPerLaunch, refs.size() - first);
      const int64_t bytes = n * static_cast<int64_t>(sizeof(seat::cuda::AdamWTensorRef));
      at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(host.data_ptr(), refs.data() + first, bytes);
      at::Tensor table = host.to(device, /*non_blocking=*/true);
      int64_t max_nnz = 0;
      for (int64_t j = 0; j < n; ++j) max_nnz = std::max(max_nnz, refs[first + j].nnz);
      const cudaError_t err = seat::cuda::sparse_adamw(
          static_cast<const seat::cuda::AdamWTensorRef*>(table.data_ptr()), n, max_nnz,
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<0>(dtypes)), "sparse_adamw_ CUDA kernel"),
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<1>(dtypes)), "sparse_adamw_ CUDA kernel"),
          scalars.data(), maximize, stochastic, static_cast<uint32_t>(step_key), dense_state, stream,
          seat::to_seat_dtype(static_cast<at::ScalarType>(std::get<2>(dtypes)), "sparse_adamw_ CUDA kernel"));
      TORCH_CHECK(err == cudaSuccess, "sparse_adamw_ CUDA kernel failed: ", cudaGetErrorString(err));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CUDA, m) { m.impl("sparse_adamw_", &sparse_adamw_cuda); }
