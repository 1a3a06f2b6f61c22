// CUDA kernel of dequant4_delta: a bitsandbytes 4-bit weight dequantized, with a sparse
// delta added at a mask's entries, in one pass. One kernel template over <mask policy,
// output dtype, NESTED> (seat/masks.h, seat/dequant4.h). A thread block takes tiles of
// kTile output elements (grid-stride): it dequantizes the tile into shared memory (a
// thread per byte: two elements), adds the tile's delta entries there, and stores the
// tile with coalesced writes. A tile's entries:
//
//   IndexMask, Block16Mask, FullMask  P::tile_slots (binary searches of the sorted
//       indices / the block's offsets, or the tile itself), a thread per slot;
//   HashMask  members numbered by warp ballots from block_offsets[b]: a warp per mask
//       block when mask blocks are at most a tile, else the tile lies in one mask block,
//       its first slot is block_offsets[b] + the members before it (counted by the
//       whole thread block), and one warp numbers the tile's members.
//
// Products and sums use __fmul_rn / __fadd_rn: rounded separately, never fused into an
// FMA, as bitsandbytes computes them (the result is bit-exact against it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "dequant4.cuh"
#include "dtype_io.cuh"
#include "seat/dequant4.h"
#include "seat/masks.h"

namespace seat::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = 4096;  // a multiple of every bnb block size and of 256 (hash blocks)
constexpr int64_t kMaxGrid = 1 << 20;

template <typename Out>
__device__ __forceinline__ Out from_float(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <bool NESTED>
__device__ __forceinline__ float block_scale(const Quant4Ref& q, int64_t b) {
  if constexpr (NESTED) {
    const uint8_t a = static_cast<const uint8_t*>(q.absmax)[b];
    return __fadd_rn(__fmul_rn(q.nested_code[a], q.nested_absmax[b / q.nested_blocksize]), q.offset);
  } else {
    return static_cast<const float*>(q.absmax)[b];
  }
}

// f(position, slot) for the entries of [begin, end) with a delta, on some thread of the
// block; every thread calls run().
template <typename P>
struct TileEntries {
  template <typename F>
  __device__ __forceinline__ static void run(const MaskRef& m, int64_t begin, int64_t end, F& f) {
    int64_t lo, hi;
    P::tile_slots(m, begin, end, &lo, &hi);
    for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
      const int64_t pos = P::tile_position(m, begin, j);
      if (pos >= begin && pos < end) f(pos, j);
    }
  }
};

// One warp numbers the members of [from, to) from `slot`, skipping slots >= limit.
template <typename F>
__device__ __forceinline__ void warp_members(const MaskRef& m, int64_t from, int64_t to, int64_t slot, int64_t limit,
                                             F& f) {
  const int lane = threadIdx.x & 31;
  for (int64_t e0 = from; e0 < to && slot < limit; e0 += 32) {
    const int64_t e = e0 + lane;
    const bool member = e < to && hash_member(m.key, e, m.threshold);
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, member);
    const int64_t s = slot + __popc(ballot & ((1u << lane) - 1u));
    if (member && s < limit) f(e, s);
    slot += __popc(ballot);
  }
}

template <>
struct TileEntries<HashMask> {
  template <typename F>
  __device__ __forceinline__ static void run(const MaskRef& m, int64_t begin, int64_t end, F& f) {
    const int warp = threadIdx.x >> 5;
    if (m.block <= kTile) {  // whole mask blocks: a warp each
      for (int64_t b = begin / m.block + warp; b < m.n_blocks && b * m.block < end; b += kWarps) {
        const int64_t first = m.index[b];
        const int64_t next = m.index[b + 1] < m.nnz ? m.index[b + 1] : m.nnz;
        const int64_t stop = (b + 1) * m.block < m.numel ? (b + 1) * m.block : m.numel;
        warp_members(m, b * m.block, stop, first, first < 0 ? first : next, f);
      }
      return;
    }
    const int64_t b = begin / m.block;  // the tile lies inside mask block b
    const int64_t first = m.index[b];
    int64_t before = 0;
    for (int64_t e0 = b * m.block; e0 < begin; e0 += kThreads) {  // begin - b * block: whole chunks
      before += __syncthreads_count(hash_member(m.key, e0 + threadIdx.x, m.threshold));
    }
    if (warp == 0) {
      const int64_t next = m.index[b + 1] < m.nnz ? m.index[b + 1] : m.nnz;
      warp_members(m, begin, end, first + before, first < 0 ? first : next, f);
    }
  }
};

// No __launch_bounds__: with it ptxas caps these at 32 registers and spills on sm_90.
template <typename P, typename Out, bool NESTED>
__global__ void dequant4_delta_kernel(const Quant4Ref q, const MaskRef m, const Out* __restrict__ delta,
                                      Out* __restrict__ out) {
  __shared__ alignas(16) unsigned char raw[kTile * sizeof(Out)];
  __shared__ float code[16];
  Out* tile = reinterpret_cast<Out*>(raw);
  if (threadIdx.x < 16) code[threadIdx.x] = q.code[threadIdx.x];
  __syncthreads();
  const int64_t tiles = (q.numel + kTile - 1) / kTile;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t begin = t * kTile;
    const int64_t end = begin + kTile < q.numel ? begin + kTile : q.numel;
    for (int64_t i = begin + 2 * threadIdx.x; i < end; i += 2 * kThreads) {  // one byte: two elements
      const uint32_t byte = q.packed[i >> 1];
      const float scale = block_scale<NESTED>(q, i / q.blocksize);  // i even: i + 1 is in the same block
      tile[i - begin] = from_float<Out>(__fmul_rn(code[byte >> 4], scale));
      if (i + 1 < end) tile[i + 1 - begin] = from_float<Out>(__fmul_rn(code[byte & 0xF], scale));
    }
    __syncthreads();
    if (m.nnz > 0) {
      auto add = [=](int64_t pos, int64_t slot) {  // by value: no locals forced onto the stack
        Out& v = tile[pos - begin];
        v = from_float<Out>(__fadd_rn(to_float(v), to_float(delta[slot])));
      };
      TileEntries<P>::run(m, begin, end, add);
      __syncthreads();
    }
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) out[i] = tile[i - begin];
    __syncthreads();  // the tile buffer is rewritten by the next tile
  }
}

template <typename P, typename Out, bool NESTED>
cudaError_t launch(const MaskRef& m, const Quant4Ref& q, void* out, const void* delta, cudaStream_t stream) {
  const int64_t tiles = (q.numel + kTile - 1) / kTile;
  if (tiles == 0) return cudaSuccess;
  const int64_t grid = tiles < kMaxGrid ? tiles : kMaxGrid;
  dequant4_delta_kernel<P, Out, NESTED><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      q, m, static_cast<const Out*>(delta), static_cast<Out*>(out));
  return cudaGetLastError();
}

template <typename P>
cudaError_t for_dtype(const MaskRef& m, const Quant4Ref& q, void* out, const void* delta, Dtype dtype, bool nested,
                      cudaStream_t stream) {
#define SEAT_DEQUANT4_MAKE(Out)                                                             \
  if (dtype == DtypeOf<Out>::value) {                                                       \
    return nested ? launch<P, Out, true>(m, q, out, delta, stream)                          \
                  : launch<P, Out, false>(m, q, out, delta, stream);                        \
  }
  SEAT_DEQUANT4_MAKE(float)
  SEAT_DEQUANT4_MAKE(__half)
  SEAT_DEQUANT4_MAKE(__nv_bfloat16)
#undef SEAT_DEQUANT4_MAKE
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t dequant4_delta(Encoding encoding, const MaskRef& m, const Quant4Ref& q, void* out, const void* delta,
                           Dtype dtype, bool nested, cudaStream_t stream) {
  if (q.blocksize < kMinQuantBlock || q.blocksize > kMaxQuantBlock || (q.blocksize & (q.blocksize - 1)) != 0)
    return cudaErrorInvalidValue;  // kTile must hold whole quantization blocks
  if (nested && q.nested_blocksize <= 0) return cudaErrorInvalidValue;
  switch (encoding) {
    case Encoding::kIndex: return for_dtype<IndexMask>(m, q, out, delta, dtype, nested, stream);
    case Encoding::kBlock16: return for_dtype<Block16Mask>(m, q, out, delta, dtype, nested, stream);
    case Encoding::kHash: return for_dtype<HashMask>(m, q, out, delta, dtype, nested, stream);
    case Encoding::kFull: return for_dtype<FullMask>(m, q, out, delta, dtype, nested, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace seat::cuda
