// CUDA kernels of masked_gather_ and masked_swap_: one thread per compact entry,
// grid-stride so any nnz fits a bounded grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "masked_ops.cuh"

namespace seat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename Acc, typename In>
__device__ __forceinline__ Acc load_as(const In* p) { return static_cast<Acc>(*p); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __half* p) { return static_cast<Acc>(__half2float(*p)); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __nv_bfloat16* p) { return static_cast<Acc>(__bfloat162float(*p)); }

template <typename Acc, typename In>
__global__ void masked_gather_kernel(Acc* __restrict__ out, const In* __restrict__ dense,
                                     const int32_t* __restrict__ idx, int64_t nnz) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nnz;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gather_accumulate<Acc>(out, i, load_as<Acc>(dense + idx[i]));
  }
}

// bf16 compact gradient (the lean mode): the sum is formed in fp32 and rounded once to
// nearest-even bf16, as on the CPU.
template <typename In>
__global__ void masked_gather_bf16_kernel(__nv_bfloat16* __restrict__ out, const In* __restrict__ dense,
                                          const int32_t* __restrict__ idx, int64_t nnz) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nnz;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16_rn(__bfloat162float(out[i]) + load_as<float>(dense + idx[i]));
  }
}

template <typename Bits>
__global__ void masked_swap_kernel(Bits* __restrict__ param, Bits* __restrict__ values,
                                   const int32_t* __restrict__ idx, int64_t nnz) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nnz;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    swap_bits<Bits>(param + idx[i], values + i);
  }
}

unsigned grid_for(int64_t nnz) {
  int64_t blocks = (nnz + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename In>
void gather_launch(float* out, const In* dense, const int32_t* idx, int64_t nnz, unsigned grid, cudaStream_t stream) {
  masked_gather_kernel<<<grid, kThreads, 0, stream>>>(out, dense, idx, nnz);
}
template <typename In>
void gather_launch(double* out, const In* dense, const int32_t* idx, int64_t nnz, unsigned grid, cudaStream_t stream) {
  masked_gather_kernel<<<grid, kThreads, 0, stream>>>(out, dense, idx, nnz);
}
template <typename In>
void gather_launch(__nv_bfloat16* out, const In* dense, const int32_t* idx, int64_t nnz, unsigned grid,
                   cudaStream_t stream) {
  masked_gather_bf16_kernel<<<grid, kThreads, 0, stream>>>(out, dense, idx, nnz);
}

template <typename Acc>
cudaError_t gather_from(Acc* out, const void* dense, Dtype dense_dtype, const int32_t* idx, int64_t nnz,
                        cudaStream_t stream) {
  const unsigned grid = grid_for(nnz);
  switch (dense_dtype) {
    case Dtype::kFloat32:
      gather_launch(out, static_cast<const float*>(dense), idx, nnz, grid, stream);
      break;
    case Dtype::kFloat64:
      gather_launch(out, static_cast<const double*>(dense), idx, nnz, grid, stream);
      break;
    case Dtype::kFloat16:
      gather_launch(out, static_cast<const __half*>(dense), idx, nnz, grid, stream);
      break;
    case Dtype::kBFloat16:
      gather_launch(out, static_cast<const __nv_bfloat16*>(dense), idx, nnz, grid, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_gather(void* out, Dtype out_dtype, const void* dense, Dtype dense_dtype, const int32_t* idx,
                          int64_t nnz, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  if (out_dtype == Dtype::kFloat32) return gather_from(static_cast<float*>(out), dense, dense_dtype, idx, nnz, stream);
  if (out_dtype == Dtype::kFloat64) return gather_from(static_cast<double*>(out), dense, dense_dtype, idx, nnz, stream);
  if (out_dtype == Dtype::kBFloat16)
    return gather_from(static_cast<__nv_bfloat16*>(out), dense, dense_dtype, idx, nnz, stream);
  return cudaErrorInvalidValue;
}

cudaError_t masked_swap(void* param, void* values, int64_t elem_size, const int32_t* idx, int64_t nnz,
                        cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  const unsigned grid = grid_for(nnz);
  switch (elem_size) {
    case 1:
      masked_swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint8_t*>(param), static_cast<uint8_t*>(values), idx, nnz);
      break;
    case 2:
      masked_swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint16_t*>(param), static_cast<uint16_t*>(values), idx, nnz);
      break;
    case 4:
      masked_swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint32_t*>(param), static_cast<uint32_t*>(values), idx, nnz);
      break;
    case 8:
      masked_swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint64_t*>(param), static_cast<uint64_t*>(values), idx, nnz);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace seat::cuda
