// Launchers of the masked_gather_ / masked_swap_ CUDA kernels. Raw pointers only, so
// masked_ops.cu needs no torch headers (it compiles in seconds per arch); the torch
// side lives in masked_ops_bind.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "seat/common.h"

namespace seat::cuda {

// out[i] += dense[idx[i]] for i < nnz; out is float32 or float64 (`out_dtype`).
cudaError_t masked_gather(void* out, Dtype out_dtype, const void* dense, Dtype dense_dtype, const int32_t* idx,
                          int64_t nnz, cudaStream_t stream);

// swap param[idx[i]] <-> values[i] for i < nnz, moving `elem_size`-byte elements.
cudaError_t masked_swap(void* param, void* values, int64_t elem_size, const int32_t* idx, int64_t nnz,
                        cudaStream_t stream);

}  // namespace seat::cuda
