// Launchers of the implicit-mask CUDA kernels (implicit_masks.cu). Raw pointers only, so
// the .cu needs no torch headers; implicit_masks_bind.cpp is the torch side.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "seat/common.h"
#include "seat/implicit_mask.h"

namespace seat::cuda {

// counts[b] = members of block b of the mask (key, threshold) over numel elements.
cudaError_t implicit_block_counts(int32_t* counts, int64_t numel, uint32_t key, int64_t threshold, int64_t block,
                                  cudaStream_t stream);

// out[slot(e)] += dense[e] for every member e; out float32 or float64 (`out_dtype`).
cudaError_t masked_gather_implicit(void* out, Dtype out_dtype, const void* dense, Dtype dense_dtype,
                                   const ImplicitMaskRef& mask, cudaStream_t stream);

// param[e] <-> values[slot(e)] for every member e, moving `elem_size`-byte elements.
cudaError_t masked_swap_implicit(void* param, void* values, int64_t elem_size, const ImplicitMaskRef& mask,
                                 cudaStream_t stream);

// One tensor of a sparse_adamw_implicit_ launch. Absent master / max_exp_avg_sq are nullptr.
struct ImplicitAdamWTensorRef {
  void* param;
  const int32_t* block_offsets;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* master;
  void* max_exp_avg_sq;
  int64_t numel;
  int64_t list_index;  // position in the op's lists: keys stochastic rounding
  int64_t threshold;
  int64_t block;       // elements per mask block, a multiple of 256
  uint32_t key;        // the mask key
};

// AdamW over `n` tensors sharing (param_dtype, state_dtype, grad_dtype: the state dtype, or
// bf16 for fp32 state); `table` in device memory;
// max_blocks (the most mask blocks of a tensor) sizes the grid.
cudaError_t sparse_adamw_implicit(const ImplicitAdamWTensorRef* table, int64_t n, int64_t max_blocks,
                                  Dtype param_dtype, Dtype state_dtype, const double* scalars, bool maximize,
                                  bool stochastic, uint32_t step_key, bool dense_state, cudaStream_t stream,
                                 Dtype grad_dtype);

}  // namespace seat::cuda
