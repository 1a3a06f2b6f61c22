// CUDA kernels of the implicit-mask ops: one thread block per mask block (grid-stride over
// blocks), walked in tiles of kThreads elements, thread t owning element tile + t. A
// member's slot is the block's first slot + members in earlier tiles + members before it
// in its tile (warp ballot + popc, then the per-warp counts in shared memory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "implicit_masks.cuh"
#include "seat/adamw.h"

namespace seat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = 1 << 20;

// f(e, slot) on the thread owning each member e of mask block b, in slot order per tile.
// Every thread of the block must call it (it synchronizes).
template <typename F>
__device__ __forceinline__ void visit_block(const ImplicitMaskRef& m, int64_t b, int32_t* warp_counts, F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t begin = b * m.block;
  const int64_t end = begin + m.block < m.numel ? begin + m.block : m.numel;
  const int64_t first = m.block_offsets[b];
  const int64_t limit = m.block_offsets[b + 1];  // slots past it belong to the next block: never written
  int64_t done = 0;
  for (int64_t tile = begin; tile < end; tile += kThreads) {
    const int64_t e = tile + threadIdx.x;
    const bool member = e < end && implicit_member(m.key, e, m.threshold);
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, member);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = warp_counts[w];
      before += w < warp ? c : 0;
      total += c;
    }
    const int64_t slot = first + done + before + __popc(ballot & ((1u << lane) - 1u));
    if (member && slot < limit) f(e, slot);
    done += total;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
}

unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid); }

__global__ void block_counts_kernel(int32_t* __restrict__ counts, int64_t numel, uint32_t key, int64_t threshold,
                                    int64_t block) {
  const int64_t n_blocks = implicit_n_blocks(numel, block);
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    const int64_t begin = b * block;
    const int64_t end = begin + block < numel ? begin + block : numel;
    int32_t total = 0;
    for (int64_t tile = begin; tile < end; tile += kThreads) {
      const int64_t e = tile + threadIdx.x;
      total += __syncthreads_count(e < end && implicit_member(key, e, threshold));
    }
    if (threadIdx.x == 0) counts[b] = total;
  }
}

template <typename Acc, typename In>
__device__ __forceinline__ Acc load_as(const In* p) { return static_cast<Acc>(*p); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __half* p) { return static_cast<Acc>(__half2float(*p)); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __nv_bfloat16* p) { return static_cast<Acc>(__bfloat162float(*p)); }

template <typename Acc, typename In>
__global__ void gather_kernel(Acc* __restrict__ out, const In* __restrict__ dense, ImplicitMaskRef m) {
  __shared__ int32_t warp_counts[kWarps];
  const int64_t n_blocks = implicit_n_blocks(m.numel, m.block);
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    visit_block(m, b, warp_counts,
                [&](int64_t e, int64_t slot) { gather_accumulate<Acc>(out, slot, load_as<Acc>(dense + e)); });
  }
}

template <typename Bits>
__global__ void swap_kernel(Bits* __restrict__ param, Bits* __restrict__ values, ImplicitMaskRef m) {
  __shared__ int32_t warp_counts[kWarps];
  const int64_t n_blocks = implicit_n_blocks(m.numel, m.block);
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    visit_block(m, b, warp_counts, [&](int64_t e, int64_t slot) { swap_bits<Bits>(param + e, values + slot); });
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
__global__ void adamw_kernel(const ImplicitAdamWTensorRef* __restrict__ table, AdamWScalars<T> s,
                             bool maximize, bool stochastic, uint32_t step_key, bool dense_state) {
  __shared__ int32_t warp_counts[kWarps];
  const ImplicitAdamWTensorRef ref = table[blockIdx.y];
  const ImplicitMaskRef m{ref.block_offsets, ref.numel, ref.block, ref.threshold, ref.key};
  const uint32_t key = tensor_key(step_key, static_cast<uint32_t>(ref.list_index));
  auto* param = static_cast<typename ParamIO::storage*>(ref.param);
  const int64_t n_blocks = implicit_n_blocks(ref.numel, ref.block);
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    visit_block(m, b, warp_counts, [&](int64_t e, int64_t slot) {
      sparse_adamw_entry<ParamIO, T, G>(param, e, static_cast<const G*>(ref.grad), static_cast<T*>(ref.exp_avg),
                                     static_cast<T*>(ref.exp_avg_sq), static_cast<T*>(ref.master),
                                     static_cast<T*>(ref.max_exp_avg_sq), slot, s, maximize, stochastic, key,
                                     dense_state);
    });
  }
}

template <typename Acc>
cudaError_t gather_from(Acc* out, const void* dense, Dtype dense_dtype, const ImplicitMaskRef& m,
                        cudaStream_t stream) {
  const unsigned grid = grid_for(implicit_n_blocks(m.numel, m.block));
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
cudaError_t launch_adamw(const ImplicitAdamWTensorRef* table, int64_t n, int64_t max_blocks, const double* scalars,
                         bool maximize, bool stochastic, uint32_t step_key, bool dense_state, cudaStream_t stream) {
  const dim3 grid(grid_for(max_blocks), static_cast<unsigned>(n));
  adamw_kernel<ParamIO, T, G><<<grid, kThreads, 0, stream>>>(table, adamw_scalars<T>(scalars), maximize,
                                                          stochastic, step_key, dense_state);
  return cudaGetLastError();
}

// fp32 state: fp32 compact grads, or bf16 ones (raw bits, upcast on load: the lean mode).
template <typename ParamIO>
cudaError_t launch_fp32_state(const ImplicitAdamWTensorRef* table, int64_t n, int64_t max_blocks, Dtype grad_dtype,
                              const double* scalars, bool maximize, bool stochastic, uint32_t step_key,
                              bool dense_state, cudaStream_t stream) {
  if (grad_dtype == Dtype::kBFloat16)
    return launch_adamw<ParamIO, float, uint16_t>(table, n, max_blocks, scalars, maximize, stochastic, step_key,
                                                  dense_state, stream);
  if (grad_dtype != Dtype::kFloat32) return cudaErrorInvalidValue;
  return launch_adamw<ParamIO, float>(table, n, max_blocks, scalars, maximize, stochastic, step_key, dense_state,
                                      stream);
}

}  // namespace

cudaError_t implicit_block_counts(int32_t* counts, int64_t numel, uint32_t key, int64_t threshold, int64_t block,
                                  cudaStream_t stream) {
  const int64_t n_blocks = implicit_n_blocks(numel, block);
  if (n_blocks == 0) return cudaSuccess;
  block_counts_kernel<<<grid_for(n_blocks), kThreads, 0, stream>>>(counts, numel, key, threshold, block);
  return cudaGetLastError();
}

cudaError_t masked_gather_implicit(void* out, Dtype out_dtype, const void* dense, Dtype dense_dtype,
                                   const ImplicitMaskRef& mask, cudaStream_t stream) {
  if (mask.numel == 0) return cudaSuccess;
  if (out_dtype == Dtype::kFloat32) return gather_from(static_cast<float*>(out), dense, dense_dtype, mask, stream);
  if (out_dtype == Dtype::kFloat64) return gather_from(static_cast<double*>(out), dense, dense_dtype, mask, stream);
  return cudaErrorInvalidValue;
}

cudaError_t masked_swap_implicit(void* param, void* values, int64_t elem_size, const ImplicitMaskRef& m,
                                 cudaStream_t stream) {
  if (m.numel == 0) return cudaSuccess;
  const unsigned grid = grid_for(implicit_n_blocks(m.numel, m.block));
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

cudaError_t sparse_adamw_implicit(const ImplicitAdamWTensorRef* table, int64_t n, int64_t max_blocks,
                                  Dtype param_dtype, Dtype state_dtype, const double* scalars, bool maximize,
                                  bool stochastic, uint32_t step_key, bool dense_state, cudaStream_t stream,
                                 Dtype grad_dtype) {
  if (n == 0 || max_blocks == 0) return cudaSuccess;
  if (n > 65535) return cudaErrorInvalidConfiguration;  // grid.y limit: the binding splits larger calls
  const bool fp32_state = state_dtype == Dtype::kFloat32;
  switch (param_dtype) {
    case Dtype::kBFloat16:
      if (!fp32_state) return cudaErrorInvalidValue;
      return launch_fp32_state<BF16IO>(table, n, max_blocks, grad_dtype, scalars, maximize, stochastic, step_key,
                                         dense_state, stream);
    case Dtype::kFloat16:
      if (!fp32_state) return cudaErrorInvalidValue;
      return launch_fp32_state<HalfIO>(table, n, max_blocks, grad_dtype, scalars, maximize, false, step_key,
                                         dense_state, stream);
    case Dtype::kFloat32:
      if (!fp32_state) return cudaErrorInvalidValue;
      return launch_fp32_state<PlainIO<float>>(table, n, max_blocks, grad_dtype, scalars, maximize, false, step_key,
                                                 dense_state, stream);
    case Dtype::kFloat64:
      if (fp32_state || grad_dtype != Dtype::kFloat64) return cudaErrorInvalidValue;
      return launch_adamw<PlainIO<double>, double>(table, n, max_blocks, scalars, maximize, false, step_key,
                                                   dense_state, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace seat::cuda
