// CUDA kernels of the block16-mask ops: one thread per compact entry (grid-stride, or
// chunks of kChunk entries per block for the multi-tensor AdamW), the entry's flat
// position decoded by a binary search of block_starts (seat/block16.h; the table is tiny
// and stays in cache).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "block16_masks.cuh"
#include "seat/adamw.h"

namespace seat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;
constexpr int64_t kChunk = 4096;

unsigned grid_for(int64_t nnz) {
  const int64_t blocks = (nnz + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename Acc, typename In>
__device__ __forceinline__ Acc load_as(const In* p) { return static_cast<Acc>(*p); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __half* p) { return static_cast<Acc>(__half2float(*p)); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __nv_bfloat16* p) { return static_cast<Acc>(__bfloat162float(*p)); }

template <typename Acc, typename In>
__global__ void gather_kernel(Acc* __restrict__ out, const In* __restrict__ dense, Block16Ref m) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < m.nnz;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gather_accumulate<Acc>(out, j, load_as<Acc>(dense + block16_position(m.block_starts, m.offsets, m.n_blocks, j)));
  }
}

template <typename Bits>
__global__ void swap_kernel(Bits* __restrict__ param, Bits* __restrict__ values, Block16Ref m) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < m.nnz;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    swap_bits<Bits>(param + block16_position(m.block_starts, m.offsets, m.n_blocks, j), values + j);
  }
}

struct HalfIO {
  using storage = __half;
  template <typename T>
  __device__ static T load(const __half* p) { return static_cast<T>(__half2float(*p)); }
  template <typename T>
  __device__ static void store(__half* p, T w, bool, uint32_t) { *p = __float2half_rn(static_cast<float>(w)); }
};

template <typename ParamIO, typename T, typename G = T>
__global__ void adamw_kernel(const Block16AdamWTensorRef* __restrict__ table, AdamWScalars<T> s, bool maximize,
                             bool stochastic, uint32_t step_key, bool dense_state) {
  const Block16AdamWTensorRef ref = table[blockIdx.y];
  const int64_t begin = blockIdx.x * kChunk;
  if (begin >= ref.nnz) return;
  const int64_t end = begin + kChunk < ref.nnz ? begin + kChunk : ref.nnz;
  const uint32_t key = tensor_key(step_key, static_cast<uint32_t>(ref.list_index));
  auto* param = static_cast<typename ParamIO::storage*>(ref.param);
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const int64_t pos = block16_position(ref.block_starts, ref.offsets, ref.n_blocks, j);
    sparse_adamw_entry<ParamIO, T, G>(param, pos, static_cast<const G*>(ref.grad), static_cast<T*>(ref.exp_avg),
                                   static_cast<T*>(ref.exp_avg_sq), static_cast<T*>(ref.master),
                                   static_cast<T*>(ref.max_exp_avg_sq), j, s, maximize, stochastic, key,
                                   dense_state);
  }
}

template <typename Acc>
cudaError_t gather_from(Acc* out, const void* dense, Dtype dense_dtype, const Block16Ref& m, cudaStream_t stream) {
  const unsigned grid = grid_for(m.nnz);
  switch (dense_dtype) {
    case Dtype::kFloat32:
      gather_kernel<<<grid, kThreads, 0, stream>>>(out, static_cast<const float*>(dense), m);
      break;
    case Dtype::kFloat64:
      gather_kernel<<<grid, kThreads, 0, stream>>>(out, static_cast<const double*>(dense), m);
      break;
    case Dtype::kFloat16:
      gather_kernel<<<grid, kThreads, 0, stream>>>(out, static_cast<const __half*>(dense), m);
      break;
    case Dtype::kBFloat16:
      gather_kernel<<<grid, kThreads, 0, stream>>>(out, static_cast<const __nv_bfloat16*>(dense), m);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename ParamIO, typename T, typename G = T>
cudaError_t launch_adamw(const Block16AdamWTensorRef* table, int64_t n, int64_t max_nnz, const double* scalars,
                         bool maximize, bool stochastic, uint32_t step_key, bool dense_state, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((max_nnz + kChunk - 1) / kChunk), static_cast<unsigned>(n));
  adamw_kernel<ParamIO, T, G><<<grid, kThreads, 0, stream>>>(table, adamw_scalars<T>(scalars), maximize, stochastic,
                                                          step_key, dense_state);
  return cudaGetLastError();
}

// fp32 state: fp32 compact grads, or bf16 ones (raw bits, upcast on load: the lean mode).
template <typename ParamIO>
cudaError_t launch_fp32_state(const Block16AdamWTensorRef* table, int64_t n, int64_t max_nnz, Dtype grad_dtype,
                              const double* scalars, bool maximize, bool stochastic, uint32_t step_key,
                              bool dense_state, cudaStream_t stream) {
  if (grad_dtype == Dtype::kBFloat16)
    return launch_adamw<ParamIO, float, uint16_t>(table, n, max_nnz, scalars, maximize, stochastic, step_key,
                                                  dense_state, stream);
  if (grad_dtype != Dtype::kFloat32) return cudaErrorInvalidValue;
  return launch_adamw<ParamIO, float>(table, n, max_nnz, scalars, maximize, stochastic, step_key, dense_state,
                                      stream);
}

}  // namespace

cudaError_t masked_gather_block16(void* out, Dtype out_dtype, const void* dense, Dtype dense_dtype,
                                  const Block16Ref& mask, cudaStream_t stream) {
  if (mask.nnz == 0) return cudaSuccess;
  if (out_dtype == Dtype::kFloat32) return gather_from(static_cast<float*>(out), dense, dense_dtype, mask, stream);
  if (out_dtype == Dtype::kFloat64) return gather_from(static_cast<double*>(out), dense, dense_dtype, mask, stream);
  return cudaErrorInvalidValue;
}

cudaError_t masked_swap_block16(void* param, void* values, int64_t elem_size, const Block16Ref& m,
                                cudaStream_t stream) {
  if (m.nnz == 0) return cudaSuccess;
  const unsigned grid = grid_for(m.nnz);
  switch (elem_size) {
    case 1:
      swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint8_t*>(param), static_cast<uint8_t*>(values), m);
      break;
    case 2:
      swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint16_t*>(param), static_cast<uint16_t*>(values), m);
      break;
    case 4:
      swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint32_t*>(param), static_cast<uint32_t*>(values), m);
      break;
    case 8:
      swap_kernel<<<grid, kThreads, 0, stream>>>(static_cast<uint64_t*>(param), static_cast<uint64_t*>(values), m);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t sparse_adamw_block16(const Block16AdamWTensorRef* table, int64_t n, int64_t max_nnz, Dtype param_dtype,
                                 Dtype state_dtype, const double* scalars, bool maximize, bool stochastic,
                                 uint32_t step_key, bool dense_state, cudaStream_t stream,
                                 Dtype grad_dtype) {
  if (n == 0 || max_nnz == 0) return cudaSuccess;
  if (n > 65535) return cudaErrorInvalidConfiguration;  // grid.y limit: the binding splits larger calls
  const bool fp32_state = state_dtype == Dtype::kFloat32;
  switch (param_dtype) {
    case Dtype::kBFloat16:
      if (!fp32_state) return cudaErrorInvalidValue;
      return launch_fp32_state<BF16IO>(table, n, max_nnz, grad_dtype, scalars, maximize, stochastic, step_key,
                                         dense_state, stream);
    case Dtype::kFloat16:
      if (!fp32_state) return cudaErrorInvalidValue;
      return launch_fp32_state<HalfIO>(table, n, max_nnz, grad_dtype, scalars, maximize, false, step_key,
                                         dense_state, stream);
    case Dtype::kFloat32:
      if (!fp32_state) return cudaErrorInvalidValue;
      return launch_fp32_state<PlainIO<float>>(table, n, max_nnz, grad_dtype, scalars, maximize, false, step_key,
                                         dense_state, stream);
    case Dtype::kFloat64:
      if (fp32_state || grad_dtype != Dtype::kFloat64) return cudaErrorInvalidValue;
      return launch_adamw<PlainIO<double>, double>(table, n, max_nnz, scalars, maximize, false, step_key,
                                                   dense_state, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace seat::cuda
