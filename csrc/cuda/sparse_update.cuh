// Launchers of the sparse-update CUDA kernels (masked_gather_, masked_swap_,
// sparse_adamw_, implicit_block_counts_), every mask encoding through one entry point per
// operation. Raw pointers only, so sparse_update.cu needs no torch headers;
// sparse_update_bind.cpp is the torch side.
//
// A mask travels as (Encoding, MaskRef) (seat/masks.h). The launchers trust a MaskRef
// whose layout mask_layout_error() accepted; the kernels then stay inside every tensor
// even if the mask's contents lie (positions >= numel and slots >= nnz are skipped).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "seat/common.h"
#include "seat/masks.h"

namespace seat::cuda {

// nullptr if the mask tensors' sizes fit the encoding (index_numel / offsets_numel: the
// sizes of mask_index / mask_offsets; m.numel, m.nnz: the parameter's and the compact
// arrays' sizes), else what is wrong.
const char* mask_layout_error(Encoding encoding, const MaskRef& m, int64_t index_numel, int64_t offsets_numel);

// out[slot] += dense[position] over the mask's entries; out float32, float64 or bfloat16
// (bfloat16: summed in fp32, rounded once to nearest-even); dense fp16/bf16/fp32/fp64.
cudaError_t masked_gather(Encoding encoding, const MaskRef& m, void* out, Dtype out_dtype, const void* dense,
                          Dtype dense_dtype, cudaStream_t stream);

// param[position] <-> values[slot], moving `elem_size`-byte elements (1, 2, 4 or 8).
cudaError_t masked_swap(Encoding encoding, const MaskRef& m, void* param, void* values, int64_t elem_size,
                        cudaStream_t stream);

// One tensor of a sparse_adamw launch. Absent master / max_exp_avg_sq are nullptr.
struct TensorRef {
  void* param;
  const void* grad;      // mask.nnz entries
  void* exp_avg;         // mask.nnz entries, or mask.numel with dense_state
  void* exp_avg_sq;
  void* master;
  void* max_exp_avg_sq;
  MaskRef mask;
  int64_t list_index;    // position in the op's lists: keys stochastic rounding
};

// Whether sparse_adamw has a kernel for these dtypes (param, state, compact gradient).
bool sparse_adamw_supports(Dtype param_dtype, Dtype state_dtype, Dtype grad_dtype);

// AdamW over the n tensors of a table (at most 65535: grid.y), all sharing the encoding
// and dtypes. host_table sizes the grid; device_table is its copy in device memory,
// which the kernels read. scalars: the 7 host scalars of seat/adamw.h; dense_state: the
// state arrays are full-size and indexed by position.
cudaError_t sparse_adamw(Encoding encoding, const TensorRef* host_table, const TensorRef* device_table, int64_t n,
                         Dtype param_dtype, Dtype state_dtype, Dtype grad_dtype, const double* scalars,
                         bool maximize, bool stochastic, uint32_t step_key, bool dense_state, cudaStream_t stream);

// counts[b] = members of block b of the hash mask (key, threshold) over numel elements.
cudaError_t implicit_block_counts(int32_t* counts, int64_t numel, uint32_t key, int64_t threshold, int64_t block,
                                  cudaStream_t stream);

}  // namespace seat::cuda
