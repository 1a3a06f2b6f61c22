// torch side of the masked_gather_ / masked_swap_ CUDA kernels: unpack tensors, pick
// the current stream and device, call the launchers in masked_ops.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "masked_ops.cuh"
#include "torch_dtype.h"

namespace {

void check_common(const at::Tensor& target, const at::Tensor& idx, const at::Tensor& compact) {
  TORCH_CHECK(target.is_cuda() && idx.device() == target.device() && compact.device() == target.device(),
              "seat_C CUDA kernel: all tensors must be on the same CUDA device");
  TORCH_CHECK(target.is_contiguous() && idx.is_contiguous() && compact.is_contiguous(),
              "seat_C CUDA kernel: all tensors must be contiguous");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1, "seat_C CUDA kernel: idx must be 1-D int32");
  TORCH_CHECK(compact.dim() == 1 && compact.numel() == idx.numel(),
              "seat_C CUDA kernel: the compact tensor must be 1-D with idx.numel() entries");
}

void masked_gather_cuda(at::Tensor out, const at::Tensor& dense, const at::Tensor& idx) {
  check_common(dense, idx, out);
  const c10::cuda::CUDAGuard guard(out.device());
  const auto out_dtype = seat::to_seat_dtype(out.scalar_type(), "masked_gather_ CUDA kernel");
  const auto dense_dtype = seat::to_seat_dtype(dense.scalar_type(), "masked_gather_ CUDA kernel");
  cudaError_t err = seat::cuda::masked_gather(out.data_ptr(), out_dtype, dense.data_ptr(), dense_dtype,
                                              idx.data_ptr<int32_t>(), idx.numel(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masked_gather_ CUDA kernel failed: ", cudaGetErrorString(err));
}

void masked_swap_cuda(at::Tensor param, const at::Tensor& idx, at::Tensor values) {
  check_common(param, idx, values);
  TORCH_CHECK(param.scalar_type() == values.scalar_type(), "masked_swap_ CUDA kernel: values must have param's dtype");
  const c10::cuda::CUDAGuard guard(param.device());
  cudaError_t err = seat::cuda::masked_swap(param.data_ptr(), values.data_ptr(), param.element_size(),
                                            idx.data_ptr<int32_t>(), idx.numel(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masked_swap_ CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CUDA, m) {
  m.impl("masked_gather_", &masked_gather_cuda);
  m.impl("masked_swap_", &masked_swap_cuda);
}
