// Launcher of the fused log-softmax loss CUDA kernel (seat_C::paired_rows). Raw
// pointers only: kl_div.cu needs no torch headers; kl_div_bind.cpp is the torch side.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "seat/common.h"

namespace seat::cuda {

// One block per row of `logits` (n_rows x vocab): rows [0, n_ce) are cross-entropy rows
// against labels (int64; label == ignore_index: 0 loss, 0 gradient), rows [n_ce, n_rows)
// KL rows against row (i - n_ce) of `ref` (kl_valid: nullptr = all valid, else one bool
// per KL row). scales: 2 values of the accumulation type (float, double for float64
// inputs) multiplying the CE and the KL gradient. per_row: n_rows losses (accumulation
// type); grad: nullptr, or n_rows x vocab in the logits' dtype. Float64 logits need
// float64 ref; the others accumulate in float whatever their mix.
cudaError_t paired_rows(const void* logits, Dtype logits_dtype, const void* ref, Dtype ref_dtype,
                        const int64_t* labels, const bool* kl_valid, const void* scales, int64_t n_rows, int64_t n_ce,
                        int64_t vocab, double temperature, int64_t ignore_index, bool reverse, void* per_row,
                        void* grad, cudaStream_t stream);

}  // namespace seat::cuda
