// Launcher of the dequant4_delta CUDA kernel (dequant4.cu). Raw pointers only, so the .cu
// needs no torch headers; dequant4_bind.cpp is the torch side. The mask travels as
// (Encoding, MaskRef) after mask_layout_error (sparse_update.cuh) accepted its sizes.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "seat/common.h"
#include "seat/dequant4.h"
#include "seat/masks.h"

namespace seat::cuda {

// out (q.numel elements of dtype: float32, float16 or bfloat16) = the 4-bit weight q
// dequantized, plus delta[slot] (m.nnz values of dtype) at each mask entry's position.
cudaError_t dequant4_delta(Encoding encoding, const MaskRef& m, const Quant4Ref& q, void* out, const void* delta,
                           Dtype dtype, bool nested, cudaStream_t stream);

}  // namespace seat::cuda
