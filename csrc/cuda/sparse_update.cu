// CUDA kernels of the sparse-update family (masked_gather_, masked_swap_, sparse_adamw_,
// implicit_block_counts_). Each operation is one kernel template over the mask policy of
// seat/masks.h and its dtypes; CudaVisit<P> says how a thread block walks a mask:
//
//   IndexMask, Block16Mask  one thread per compact entry (grid-stride, or a chunk of
//                           entries per thread block in the multi-tensor AdamW);
//                           P::position gives the entry's flat position (block16: a binary
//                           search of the block starts, a tiny table that stays in cache).
//   HashMask                one thread block per mask block, grid-stride over blocks, in
//                           tiles of kThreads elements; a member's slot is the block's
//                           first slot + members of earlier tiles + members before it in
//                           its tile (warp ballot + popc, per-warp counts in shared memory).
//                           Positions must be recomputed in order, so it cannot be
//                           per-entry; the CPU walks a block serially instead.
//
//   FullMask                as IndexMask, position = slot (no index to read).
//
// with_policy() is the only switch on the encoding; the dtype combinations that exist are
// the instantiation lists (SEAT_*_LIST), from which the dtype dispatch is generated.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "dtype_io.cuh"
#include "seat/adamw.h"
#include "seat/masks.h"
#include "sparse_update.cuh"

namespace seat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride loops cover the rest
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;  // the hardware limit
// Entries per thread block of the per-entry AdamW (16 per thread): amortizes the table
// load and keeps the empty blocks of a table's small tensors few.
constexpr int64_t kAdamWChunk = 4096;

int64_t capped_grid(int64_t blocks) { return blocks < kMaxGrid ? blocks : kMaxGrid; }

// How a launch spreads a mask over thread blocks. kGridStride (single-tensor launches):
// a bounded grid strides over the entries, so any nnz fits. kChunk (the multi-tensor
// AdamW): block x takes entries [x * kAdamWChunk, (x + 1) * kAdamWChunk) of its tensor,
// the grid covering the table's largest tensor, so a small tensor's surplus blocks exit
// at once (and, measured with ptxas, it needs fewer registers than a grid-stride loop).
// HashMask strides over mask blocks under either.
enum class Schedule { kGridStride, kChunk };

// CudaVisit<P>::run<S>(m, f) calls f(position, slot) on this thread block's share of m's
// entries, only for positions in [0, numel) and slots in [0, nnz), whatever the mask
// tensors hold; grid<S>(max_work) sizes grid.x for the largest work(m) of a launch.
// Every thread of a block must call run().
template <typename P>
struct CudaVisit {
  static int64_t work(const MaskRef& m) { return m.nnz; }
  template <Schedule S>
  static int64_t grid(int64_t max_work) {
    if constexpr (S == Schedule::kChunk) return (max_work + kAdamWChunk - 1) / kAdamWChunk;
    return capped_grid((max_work + kThreads - 1) / kThreads);
  }

  template <Schedule S, typename F>
  __device__ __forceinline__ static void run(const MaskRef& m, F&& f) {
    if constexpr (S == Schedule::kChunk) {
      const int64_t begin = blockIdx.x * kAdamWChunk;
      const int64_t end = begin + kAdamWChunk < m.nnz ? begin + kAdamWChunk : m.nnz;
      for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) visit(m, j, f);
    } else {
      for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < m.nnz;
           j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        visit(m, j, f);
      }
    }
  }

  template <typename F>
  __device__ __forceinline__ static void visit(const MaskRef& m, int64_t j, F& f) {
    const int64_t pos = P::position(m, j);
    // pos in [0, numel) as one unsigned compare (a negative position wraps high). int32
    // indices compare in 32 bits against min(numel, 2**31): a 64-bit bound costs the
    // AdamW kernels the register that crosses sm_86/89's 40-register occupancy step.
    if constexpr (std::is_same_v<P, IndexMask>) {
      const uint32_t bound = m.numel < (int64_t{1} << 31) ? static_cast<uint32_t>(m.numel) : (1u << 31);
      if (static_cast<uint32_t>(pos) < bound) f(pos, j);
    } else {
      if (static_cast<uint64_t>(pos) < static_cast<uint64_t>(m.numel)) f(pos, j);
    }
  }
};

template <>
struct CudaVisit<HashMask> {
  static int64_t work(const MaskRef& m) { return m.n_blocks; }
  template <Schedule>
  static int64_t grid(int64_t max_work) { return capped_grid(max_work); }

  template <Schedule, typename F>
  __device__ __forceinline__ static void run(const MaskRef& m, F&& f) {
    __shared__ int32_t warp_counts[kWarps];
    for (int64_t b = blockIdx.x; b < m.n_blocks; b += gridDim.x) visit_block(m, b, warp_counts, f);
  }

  // f(e, slot) on the thread owning each member e of mask block b, in slot order per tile.
  template <typename F>
  __device__ __forceinline__ static void visit_block(const MaskRef& m, int64_t b, int32_t* warp_counts, F& f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t begin = b * m.block;
    const int64_t end = begin + m.block < m.numel ? begin + m.block : m.numel;
    const int64_t first = m.index[b];
    // Slots at or past the next block's first slot (or nnz) belong elsewhere: never
    // written. A negative first slot empties the block (every slot here is >= first).
    int64_t limit = m.index[b + 1];
    limit = limit < m.nnz ? limit : m.nnz;
    limit = first < 0 ? first : limit;
    int64_t done = 0;
    for (int64_t tile = begin; tile < end; tile += kThreads) {
      const int64_t e = tile + threadIdx.x;
      const bool member = e < end && hash_member(m.key, e, m.threshold);
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
};

// ---- kernels: one per operation, over (policy, dtypes) ----

template <typename P, typename Out, typename In>
__global__ void gather_kernel(Out* __restrict__ out, const In* __restrict__ dense, const MaskRef m) {
  using Sum = typename SumOf<Out>::type;
  CudaVisit<P>::template run<Schedule::kGridStride>(m, [&](int64_t pos, int64_t slot) {
    store_as(out + slot, load_as<Sum>(out + slot) + load_as<Sum>(dense + pos));
  });
}

template <typename P, typename Bits>
__global__ void swap_kernel(Bits* __restrict__ param, Bits* __restrict__ values, const MaskRef m) {
  CudaVisit<P>::template run<Schedule::kGridStride>(
      m, [&](int64_t pos, int64_t slot) { swap_bits<Bits>(param + pos, values + slot); });
}

// grid (x: this tensor's share, y: the tensor of the table).
template <typename P, typename Param, typename State, typename Grad>
__global__ void adamw_kernel(const TensorRef* __restrict__ table, const AdamWScalars<State> s, bool maximize,
                             bool stochastic, uint32_t step_key, bool dense_state) {
  using IO = typename ParamIOOf<Param>::type;
  using G = typename GradStorageOf<Grad>::type;
  const TensorRef ref = table[blockIdx.y];
  const uint32_t key = tensor_key(step_key, static_cast<uint32_t>(ref.list_index));
  // Only bf16 params round stochastically: the others drop the random bits at compile time.
  const bool round_stochastic = ParamIOOf<Param>::kStochastic && stochastic;
  auto* param = static_cast<typename IO::storage*>(ref.param);
  CudaVisit<P>::template run<Schedule::kChunk>(ref.mask, [&](int64_t pos, int64_t slot) {
    sparse_adamw_entry<IO, State, G>(param, pos, static_cast<const G*>(ref.grad), static_cast<State*>(ref.exp_avg),
                                     static_cast<State*>(ref.exp_avg_sq), static_cast<State*>(ref.master),
                                     static_cast<State*>(ref.max_exp_avg_sq), slot, s, maximize, round_stochastic,
                                     key, dense_state);
  });
}

// One thread block per mask block: __syncthreads_count sums the members of each tile.
__global__ void block_counts_kernel(int32_t* __restrict__ counts, int64_t numel, uint32_t key, int64_t threshold,
                                    int64_t block) {
  const int64_t n_blocks = n_blocks_of(numel, block);
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    const int64_t begin = b * block;
    const int64_t end = begin + block < numel ? begin + block : numel;
    int32_t total = 0;
    for (int64_t tile = begin; tile < end; tile += kThreads) {
      const int64_t e = tile + threadIdx.x;
      total += __syncthreads_count(e < end && hash_member(key, e, threshold));
    }
    if (threadIdx.x == 0) counts[b] = total;
  }
}

// ---- launchers ----

template <typename P, typename Out, typename In>
cudaError_t launch_gather(const MaskRef& m, void* out, const void* dense, cudaStream_t stream) {
  const int64_t grid = CudaVisit<P>::template grid<Schedule::kGridStride>(CudaVisit<P>::work(m));
  if (grid == 0) return cudaSuccess;
  gather_kernel<P, Out, In><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<Out*>(out), static_cast<const In*>(dense), m);
  return cudaGetLastError();
}

template <typename P, typename Bits>
cudaError_t launch_swap(const MaskRef& m, void* param, void* values, cudaStream_t stream) {
  const int64_t grid = CudaVisit<P>::template grid<Schedule::kGridStride>(CudaVisit<P>::work(m));
  if (grid == 0) return cudaSuccess;
  swap_kernel<P, Bits><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<Bits*>(param), static_cast<Bits*>(values), m);
  return cudaGetLastError();
}

template <typename P, typename Param, typename State, typename Grad>
cudaError_t launch_adamw(dim3 grid, const TensorRef* table, const double* scalars, bool maximize, bool stochastic,
                         uint32_t step_key, bool dense_state, cudaStream_t stream) {
  adamw_kernel<P, Param, State, Grad><<<grid, kThreads, 0, stream>>>(table, adamw_scalars<State>(scalars), maximize,
                                                                     stochastic, step_key, dense_state);
  return cudaGetLastError();
}

// ---- instantiation lists ----
// Each MAKE entry is one kernel per mask policy: the *_for<P> dispatchers below are
// generated from these lists and with_policy instantiates them for IndexMask,
// Block16Mask and HashMask, so the kernels that exist are exactly policies x lists, and a
// dtype combination outside the lists is refused (cudaErrorInvalidValue), never built.

// masked_gather_: (out, dense)
#define SEAT_GATHER_LIST(MAKE)                                                                         \
  MAKE(float, float) MAKE(float, double) MAKE(float, __half) MAKE(float, __nv_bfloat16)                \
  MAKE(double, float) MAKE(double, double) MAKE(double, __half) MAKE(double, __nv_bfloat16)            \
  MAKE(__nv_bfloat16, float) MAKE(__nv_bfloat16, double) MAKE(__nv_bfloat16, __half)                   \
  MAKE(__nv_bfloat16, __nv_bfloat16)
// masked_swap_: the element's bits
#define SEAT_SWAP_LIST(MAKE) MAKE(uint8_t) MAKE(uint16_t) MAKE(uint32_t) MAKE(uint64_t)
// sparse_adamw_: (param, state, compact gradient)
#define SEAT_ADAMW_LIST(MAKE)                                                                          \
  MAKE(__nv_bfloat16, float, float) MAKE(__nv_bfloat16, float, __nv_bfloat16)                          \
  MAKE(__half, float, float) MAKE(__half, float, __nv_bfloat16)                                        \
  MAKE(float, float, float) MAKE(float, float, __nv_bfloat16)                                          \
  MAKE(double, double, double)

template <typename P>
cudaError_t gather_for(const MaskRef& m, void* out, Dtype out_dtype, const void* dense, Dtype dense_dtype,
                       cudaStream_t stream) {
#define MAKE_GATHER(Out, In)                                                  \
  if (out_dtype == DtypeOf<Out>::value && dense_dtype == DtypeOf<In>::value) \
    return launch_gather<P, Out, In>(m, out, dense, stream);
  SEAT_GATHER_LIST(MAKE_GATHER)
#undef MAKE_GATHER
  return cudaErrorInvalidValue;
}

template <typename P>
cudaError_t swap_for(const MaskRef& m, void* param, void* values, int64_t elem_size, cudaStream_t stream) {
#define MAKE_SWAP(Bits) \
  if (elem_size == static_cast<int64_t>(sizeof(Bits))) return launch_swap<P, Bits>(m, param, values, stream);
  SEAT_SWAP_LIST(MAKE_SWAP)
#undef MAKE_SWAP
  return cudaErrorInvalidValue;
}

// Whether (param_dtype, state_dtype, grad_dtype), in scope where it is used, is this entry.
#define SEAT_ADAMW_MATCH(Param, State, Grad)                                       \
  (param_dtype == DtypeOf<Param>::value && state_dtype == DtypeOf<State>::value && \
   grad_dtype == DtypeOf<Grad>::value)

template <typename P>
cudaError_t adamw_for(const TensorRef* host_table, const TensorRef* device_table, int64_t n, Dtype param_dtype,
                      Dtype state_dtype, Dtype grad_dtype, const double* scalars, bool maximize, bool stochastic,
                      uint32_t step_key, bool dense_state, cudaStream_t stream) {
  int64_t max_work = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t w = CudaVisit<P>::work(host_table[i].mask);
    max_work = w > max_work ? w : max_work;
  }
  const int64_t grid_x = CudaVisit<P>::template grid<Schedule::kChunk>(max_work);
  if (grid_x == 0) return cudaSuccess;
  if (grid_x > kMaxGridX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(n));
#define MAKE_ADAMW(Param, State, Grad)                                                                    \
  if (SEAT_ADAMW_MATCH(Param, State, Grad))                                                               \
    return launch_adamw<P, Param, State, Grad>(grid, device_table, scalars, maximize, stochastic, step_key, \
                                               dense_state, stream);
  SEAT_ADAMW_LIST(MAKE_ADAMW)
#undef MAKE_ADAMW
  return cudaErrorInvalidValue;
}

// ---- mask layouts: what the tensors' sizes must be for the kernels' reads to stay inside them ----

template <typename P>
const char* layout_error(const MaskRef& m, int64_t index_numel, int64_t offsets_numel);

template <>
const char* layout_error<IndexMask>(const MaskRef& m, int64_t index_numel, int64_t offsets_numel) {
  if (index_numel != m.nnz) return "mask_index must hold one int32 index per compact entry";
  if (offsets_numel != 0) return "mask_offsets must be empty for int32 indices";
  return nullptr;
}

template <>
const char* layout_error<Block16Mask>(const MaskRef& m, int64_t index_numel, int64_t offsets_numel) {
  if (index_numel != n_blocks_of(m.numel, kBlock16) + 1 || m.n_blocks != index_numel - 1)
    return "mask_index (block_starts) must hold ceil(numel / 65536) + 1 int32 entries";
  if (offsets_numel != m.nnz || (m.nnz > 0 && m.offsets == nullptr))
    return "mask_offsets must hold one uint16 offset per compact entry";
  return nullptr;
}

template <>
const char* layout_error<FullMask>(const MaskRef& m, int64_t index_numel, int64_t offsets_numel) {
  if (index_numel != 0) return "mask_index must be empty for a full mask";
  if (offsets_numel != 0) return "mask_offsets must be empty for a full mask";
  if (m.nnz != m.numel) return "a full mask needs one compact entry per element";
  return nullptr;
}

template <>
const char* layout_error<HashMask>(const MaskRef& m, int64_t index_numel, int64_t offsets_numel) {
  if (m.block < 256 || m.block > 65536 || (m.block & (m.block - 1)) != 0)
    return "block must be a power of two in [256, 65536]";
  if (m.threshold < 0 || m.threshold > (int64_t{1} << 32)) return "threshold must be in [0, 2**32]";
  // mix32 hashes the position as 32 bits: past 2**31 elements positions would alias (the
  // same limit as the CPU kernels and python/seat/ops/_encodings.py).
  if (m.numel > 0x7FFFFFFF) return "hash masks reach at most 2**31-1 elements";
  if (index_numel != n_blocks_of(m.numel, m.block) + 1 || m.n_blocks != index_numel - 1)
    return "mask_index (block_offsets) must hold ceil(numel / block) + 1 int32 entries";
  if (offsets_numel != 0) return "mask_offsets must be empty for hash masks";
  return nullptr;
}

// The one switch on the encoding: fn(P{}) for its policy, `unknown` for an unknown id.
template <typename R, typename Fn>
R with_policy(Encoding encoding, R unknown, Fn&& fn) {
  switch (encoding) {
    case Encoding::kIndex: return fn(IndexMask{});
    case Encoding::kBlock16: return fn(Block16Mask{});
    case Encoding::kHash: return fn(HashMask{});
    case Encoding::kFull: return fn(FullMask{});
  }
  return unknown;
}

}  // namespace

const char* mask_layout_error(Encoding encoding, const MaskRef& m, int64_t index_numel, int64_t offsets_numel) {
  if (m.numel < 0 || m.nnz < 0) return "negative sizes";
  return with_policy(encoding, "unknown mask encoding", [&](auto policy) {
    return layout_error<decltype(policy)>(m, index_numel, offsets_numel);
  });
}

cudaError_t masked_gather(Encoding encoding, const MaskRef& m, void* out, Dtype out_dtype, const void* dense,
                          Dtype dense_dtype, cudaStream_t stream) {
  if (m.nnz == 0) return cudaSuccess;
  return with_policy(encoding, cudaErrorInvalidValue, [&](auto policy) {
    return gather_for<decltype(policy)>(m, out, out_dtype, dense, dense_dtype, stream);
  });
}

cudaError_t masked_swap(Encoding encoding, const MaskRef& m, void* param, void* values, int64_t elem_size,
                        cudaStream_t stream) {
  if (m.nnz == 0) return cudaSuccess;
  return with_policy(encoding, cudaErrorInvalidValue, [&](auto policy) {
    return swap_for<decltype(policy)>(m, param, values, elem_size, stream);
  });
}

bool sparse_adamw_supports(Dtype param_dtype, Dtype state_dtype, Dtype grad_dtype) {
#define MAKE_SUPPORTS(Param, State, Grad) \
  if (SEAT_ADAMW_MATCH(Param, State, Grad)) return true;
  SEAT_ADAMW_LIST(MAKE_SUPPORTS)
#undef MAKE_SUPPORTS
  return false;
}

cudaError_t sparse_adamw(Encoding encoding, const TensorRef* host_table, const TensorRef* device_table, int64_t n,
                         Dtype param_dtype, Dtype state_dtype, Dtype grad_dtype, const double* scalars,
                         bool maximize, bool stochastic, uint32_t step_key, bool dense_state, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > 65535) return cudaErrorInvalidConfiguration;  // grid.y limit: the binding splits larger calls
  return with_policy(encoding, cudaErrorInvalidValue, [&](auto policy) {
    return adamw_for<decltype(policy)>(host_table, device_table, n, param_dtype, state_dtype, grad_dtype, scalars,
                                       maximize, stochastic, step_key, dense_state, stream);
  });
}

cudaError_t implicit_block_counts(int32_t* counts, int64_t numel, uint32_t key, int64_t threshold, int64_t block,
                                  cudaStream_t stream) {
  if (block <= 0) return cudaErrorInvalidValue;
  const int64_t n_blocks = n_blocks_of(numel, block);
  if (n_blocks <= 0) return cudaSuccess;
  block_counts_kernel<<<static_cast<unsigned>(capped_grid(n_blocks)), kThreads, 0, stream>>>(counts, numel, key,
                                                                                            threshold, block);
  return cudaGetLastError();
}

}  // namespace seat::cuda
