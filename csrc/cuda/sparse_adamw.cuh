// Launcher of the sparse_adamw_ CUDA kernel (multi-tensor over a device-side table).
// Raw pointers only: sparse_adamw.cu needs no torch headers; sparse_adamw_bind.cpp
// builds the table from tensors.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "seat/common.h"

namespace seat::cuda {

// One tensor of a launch. Absent master / max_exp_avg_sq are nullptr.
struct AdamWTensorRef {
  void* param;
  const int32_t* idx;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* master;
  void* max_exp_avg_sq;
  int64_t nnz;
  int64_t list_index;  // position in the op's lists: keys stochastic rounding
};

// AdamW over `n` tensors sharing (param_dtype, state_dtype); `table` is in device memory,
// `scalars` the 7 host scalars of seat/adamw.h; max_nnz sizes the grid; dense_state:
// state arrays are full-size and indexed by position; grad_dtype: the compact gradients'
// type, state_dtype or (for fp32 state) bf16.
cudaError_t sparse_adamw(const AdamWTensorRef* table, int64_t n, int64_t max_nnz, Dtype param_dtype,
                         Dtype state_dtype, const double* scalars, bool maximize, bool stochastic, uint32_t step_key,
                         bool dense_state, cudaStream_t stream, Dtype grad_dtype);

}  // namespace seat::cuda
