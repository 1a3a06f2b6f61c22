// Launchers of the block16-mask CUDA kernels (block16_masks.cu). Raw pointers only, so
// the .cu needs no torch headers; block16_masks_bind.cpp is the torch side.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "seat/block16.h"
#include "seat/common.h"

namespace seat::cuda {

// One mask as the kernels see it (seat/block16.h).
struct Block16Ref {
  const int32_t* block_starts;  // n_blocks + 1
  const uint16_t* offsets;      // nnz
  int64_t n_blocks;
  int64_t nnz;
};

// out[j] += dense[position(j)]; out float32 or float64 (`out_dtype`).
cudaError_t masked_gather_block16(void* out, Dtype out_dtype, const void* dense, Dtype dense_dtype,
                                  const Block16Ref& mask, cudaStream_t stream);

// param[position(j)] <-> values[j], moving `elem_size`-byte elements.
cudaError_t masked_swap_block16(void* param, void* values, int64_t elem_size, const Block16Ref& mask,
                                cudaStream_t stream);

// One tensor of a sparse_adamw_block16_ launch. Absent master / max_exp_avg_sq are nullptr.
struct Block16AdamWTensorRef {
  void* param;
  const int32_t* block_starts;
  const uint16_t* offsets;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* master;
  void* max_exp_avg_sq;
  int64_t n_blocks;
  int64_t nnz;
  int64_t list_index;  // position in the op's lists: keys stochastic rounding
};

// AdamW over `n` tensors sharing (param_dtype, state_dtype, grad_dtype: the state dtype, or
// bf16 for fp32 state); `table` in device memory;
// max_nnz sizes the grid.
cudaError_t sparse_adamw_block16(const Block16AdamWTensorRef* table, int64_t n, int64_t max_nnz, Dtype param_dtype,
                                 Dtype state_dtype, const double* scalars, bool maximize, bool stochastic,
                                 uint32_t step_key, bool dense_state, cudaStream_t stream,
                                 Dtype grad_dtype);

}  // namespace seat::cuda
