// CUDA kernel of sparse_adamw_: grid (chunks of kChunk entries, tensors); each block
// walks its chunk with coalesced accesses to the compact arrays and scattered ones to
// the param, running the shared per-element step (seat/adamw.h).
#include <cuda_fp16.h>

#include "seat/adamw.h"
#include "sparse_adamw.cuh"

namespace seat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;

struct HalfIO {
  using storage = __half;
  template <typename T>
  __device__ static T load(const __half* p) { return static_cast<T>(__half2float(*p)); }
  template <typename T>
  __device__ static void store(__half* p, T w, bool, uint32_t) { *p = __float2half_rn(static_cast<float>(w)); }
};

template <typename ParamIO, typename T, typename G>
__global__ void sparse_adamw_kernel(const AdamWTensorRef* __restrict__ table, AdamWScalars<T> s, bool maximize,
                                    bool stochastic, uint32_t step_key, bool dense_state) {
  const AdamWTensorRef ref = table[blockIdx.y];
  const int64_t begin = blockIdx.x * kChunk;
  if (begin >= ref.nnz) return;
  const int64_t end = begin + kChunk < ref.nnz ? begin + kChunk : ref.nnz;
  const uint32_t key = tensor_key(step_key, static_cast<uint32_t>(ref.list_index));
  auto* param = static_cast<typename ParamIO::storage*>(ref.param);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    sparse_adamw_element<ParamIO, T, G>(param, ref.idx, static_cast<const G*>(ref.grad), static_cast<T*>(ref.exp_avg),
                                     static_cast<T*>(ref.exp_avg_sq), static_cast<T*>(ref.master),
                                     static_cast<T*>(ref.max_exp_avg_sq), i, s, maximize, stochastic, key,
                                     dense_state);
  }
}

template <typename ParamIO, typename T, typename G = T>
cudaError_t launch(const AdamWTensorRef* table, int64_t n, int64_t max_nnz, const double* scalars, bool maximize,
                   bool stochastic, uint32_t step_key, bool dense_state, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((max_nnz + kChunk - 1) / kChunk), static_cast<unsigned>(n));
  sparse_adamw_kernel<ParamIO, T, G><<<grid, kThreads, 0, stream>>>(table, adamw_scalars<T>(scalars), maximize,
                                                                     stochastic, step_key, dense_state);
  return cudaGetLastError();
}

// fp32 state: fp32 compact grads, or bf16 ones (raw bits, upcast on load: the lean mode).
template <typename ParamIO>
cudaError_t launch_fp32_state(const AdamWTensorRef* table, int64_t n, int64_t max_nnz, Dtype grad_dtype,
                              const double* scalars, bool maximize, bool stochastic, uint32_t step_key,
                              bool dense_state, cudaStream_t stream) {
  if (grad_dtype == Dtype::kBFloat16)
    return launch<ParamIO, float, uint16_t>(table, n, max_nnz, scalars, maximize, stochastic, step_key, dense_state,
                                            stream);
  if (grad_dtype != Dtype::kFloat32) return cudaErrorInvalidValue;
  return launch<ParamIO, float>(table, n, max_nnz, scalars, maximize, stochastic, step_key, dense_state, stream);
}

}  // namespace

cudaError_t sparse_adamw(const AdamWTensorRef* table, int64_t n, int64_t max_nnz, Dtype param_dtype,
                         Dtype state_dtype, const double* scalars, bool maximize, bool stochastic, uint32_t step_key,
                         bool dense_state, cudaStream_t stream, Dtype grad_dtype) {
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
      return launch<PlainIO<double>, double>(table, n, max_nnz, scalars, maximize, false, step_key, dense_state, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace seat::cuda
