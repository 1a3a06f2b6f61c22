// torch side of the paired_rows CUDA kernel: check, allocate the outputs, launch on the
// current stream (kernel and launcher in kl_div.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "kl_div.cuh"
#include "torch_dtype.h"

namespace {

std::tuple<at::Tensor, at::Tensor> paired_rows_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                    const at::Tensor& ref_logits, const at::Tensor& kl_valid,
                                                    const at::Tensor& scales, double temperature,
                                                    int64_t ignore_index, bool reverse, bool compute_grad) {
  TORCH_CHECK(logits.dim() == 2 && ref_logits.dim() == 2 && logits.is_contiguous() && ref_logits.is_contiguous(),
              "paired_rows CUDA kernel: logits and ref_logits must be contiguous 2-D");
  TORCH_CHECK(ref_logits.size(1) == logits.size(1), "paired_rows CUDA kernel: vocabulary sizes differ");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.is_contiguous(),
              "paired_rows CUDA kernel: labels must be contiguous 1-D int64");
  TORCH_CHECK(labels.numel() + ref_logits.size(0) == logits.size(0),
              "paired_rows CUDA kernel: logits must have labels.numel() + ref_logits.size(0) rows");
  TORCH_CHECK(kl_valid.numel() == 0 || (kl_valid.scalar_type() == at::kBool && kl_valid.numel() == ref_logits.size(0)
                                        && kl_valid.is_contiguous()),
              "paired_rows CUDA kernel: kl_valid must be empty or one bool per ref_logits row");
  const bool fp64 = logits.scalar_type() == at::kDouble;
  TORCH_CHECK(fp64 == (ref_logits.scalar_type() == at::kDouble),
              "paired_rows CUDA kernel: float64 logits need float64 ref_logits and vice versa");
  const at::ScalarType acc = fp64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(scales.scalar_type() == acc && scales.numel() == 2 && scales.is_contiguous(),
              "paired_rows CUDA kernel: scales must hold 2 values of the accumulation dtype");
  for (const auto* t : {&labels, &ref_logits, &kl_valid, &scales}) {
    TORCH_CHECK(t->device() == logits.device(), "paired_rows CUDA kernel: every tensor must be on ", logits.device());
  }
  TORCH_CHECK(logits.is_cuda(), "paired_rows CUDA kernel: logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor per_row = at::empty({logits.size(0)}, logits.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  const cudaError_t err = seat::cuda::paired_rows(
      logits.data_ptr(), seat::to_seat_dtype(logits.scalar_type(), "paired_rows CUDA kernel"), ref_logits.data_ptr(),
      seat::to_seat_dtype(ref_logits.scalar_type(), "paired_rows CUDA kernel"), labels.data_ptr<int64_t>(),
      kl_valid.numel() > 0 ? kl_valid.data_ptr<bool>() : nullptr, scales.data_ptr(), logits.size(0), labels.numel(),
      logits.size(1), temperature, ignore_index, reverse, per_row.data_ptr(), compute_grad ? grad.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "paired_rows CUDA kernel failed: ", cudaGetErrorString(err));
  return {per_row, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CUDA, m) { m.impl("paired_rows", &paired_rows_cuda); }
