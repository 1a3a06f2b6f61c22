// CUDA kernel of the fused log-softmax losses (seat_C::paired_rows): one block per row.
//   pass 1: each thread runs the online log-softmax (running max, running sum of exp;
//           seat/kl_div.h) of both inputs over its strided share of the row, then the
//           block merges the per-thread states (warp shuffles, then one warp);
//   pass 2: the gradient w.r.t. the row's logits, written straight to the output.
// Two coalesced reads of the row and one write; no other N x V memory.
#include <cuda_fp16.h>

#include "kl_div.cuh"
#include "seat/adamw.h"  // bf16_to_float / float_to_bf16 (round to nearest even)
#include "seat/kl_div.h"

namespace seat::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct BF16Bits {
  uint16_t bits;
};

template <typename T>
struct IO;
template <>
struct IO<float> {
  template <typename A>
  __device__ static A load(const float* p) { return static_cast<A>(*p); }
  template <typename A>
  __device__ static void store(float* p, A v) { *p = static_cast<float>(v); }
};
template <>
struct IO<double> {
  template <typename A>
  __device__ static A load(const double* p) { return static_cast<A>(*p); }
  template <typename A>
  __device__ static void store(double* p, A v) { *p = static_cast<double>(v); }
};
template <>
struct IO<__half> {
  template <typename A>
  __device__ static A load(const __half* p) { return static_cast<A>(__half2float(*p)); }
  template <typename A>
  __device__ static void store(__half* p, A v) { *p = __float2half_rn(static_cast<float>(v)); }
};
template <>
struct IO<BF16Bits> {
  template <typename A>
  __device__ static A load(const BF16Bits* p) { return static_cast<A>(bf16_to_float(p->bits)); }
  template <typename A>
  __device__ static void store(BF16Bits* p, A v) { p->bits = float_to_bf16(static_cast<float>(v), false, 0u); }
};

template <typename A>
__device__ OnlineLse<A> shfl_state(const OnlineLse<A>& st, int mask) {
  return {__shfl_xor_sync(0xffffffffu, st.m, mask), __shfl_xor_sync(0xffffffffu, st.s, mask),
          __shfl_xor_sync(0xffffffffu, st.a, mask)};
}

// Merge every thread's state; all threads get the row's state. Fixed order: the same
// inputs give the same bits (identical cur and ref rows give identical states).
template <typename A>
__device__ OnlineLse<A> block_merge(OnlineLse<A> st, OnlineLse<A>* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int mask = 16; mask > 0; mask /= 2) st = online_merge(st, shfl_state(st, mask));
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  st = lane < kWarps ? shared[lane] : online_init<A>();
  for (int mask = 16; mask > 0; mask /= 2) st = online_merge(st, shfl_state(st, mask));
  __syncthreads();  // shared[] is reused by the next merge
  return st;
}

template <typename TC, typename TR, typename A>
__global__ void __launch_bounds__(kThreads) paired_rows_kernel(
    const TC* __restrict__ logits, const TR* __restrict__ ref, const int64_t* __restrict__ labels,
    const bool* __restrict__ kl_valid, const A* __restrict__ scales, int64_t n_ce, int64_t vocab, A inv_t,
    int64_t ignore_index, bool reverse, A* __restrict__ per_row, TC* __restrict__ grad) {
  __shared__ OnlineLse<A> shared[kWarps];
  const int64_t row = blockIdx.x;
  const TC* x = logits + row * vocab;
  TC* g = grad != nullptr ? grad + row * vocab : nullptr;
  const bool is_ce = row < n_ce;
  const int64_t label = is_ce ? labels[row] : 0;
  const bool valid = is_ce ? label != ignore_index : (kl_valid == nullptr || kl_valid[row - n_ce]);
  if (!valid) {  // ignored x row / masked x~ row: no loss, no gradient
    if (threadIdx.x == 0) per_row[row] = A(0);
    if (g != nullptr) {
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) IO<TC>::store(g + v, A(0));
    }
    return;
  }
  if (is_ce) {
    OnlineLse<A> st = online_init<A>();
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) online_add(st, IO<TC>::template load<A>(x + v), A(0));
    st = block_merge(st, shared);
    const A ls = online_log_s(st);
    if (threadIdx.x == 0) per_row[row] = (st.m - IO<TC>::template load<A>(x + label)) + ls;
    if (g != nullptr) {
      const A factor = scales[0];
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        IO<TC>::store(g + v, ce_grad(IO<TC>::template load<A>(x + v), st.m, ls, v == label, factor));
      }
    }
    return;
  }
  const TR* r = ref + (row - n_ce) * vocab;
  OnlineLse<A> sc = online_init<A>(), sr = online_init<A>();
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const A c = IO<TC>::template load<A>(x + v) * inv_t;
    const A q = IO<TR>::template load<A>(r + v) * inv_t;
    online_add(sc, c, c - q);
    online_add(sr, q, q - c);
  }
  sc = block_merge(sc, shared);
  sr = block_merge(sr, shared);
  const A kl = reverse ? kl_value(sc, sr) : kl_value(sr, sc);
  const A ls_c = online_log_s(sc), ls_r = online_log_s(sr), dlse = lse_difference(sc, sr);
  if (threadIdx.x == 0) per_row[row] = kl;
  if (g != nullptr) {
    const A factor = scales[1];
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const A c = IO<TC>::template load<A>(x + v) * inv_t;
      const A q = IO<TR>::template load<A>(r + v) * inv_t;
      IO<TC>::store(g + v, reverse ? kl_reverse_grad(c, q, sc.m, ls_c, dlse, kl, factor)
                                   : kl_forward_grad(c, q, sc.m, ls_c, sr.m, ls_r, factor));
    }
  }
}

template <typename TC, typename TR, typename A>
cudaError_t launch(const void* logits, const void* ref, const int64_t* labels, const bool* kl_valid,
                   const void* scales, int64_t n_rows, int64_t n_ce, int64_t vocab, double temperature,
                   int64_t ignore_index, bool reverse, void* per_row, void* grad, cudaStream_t stream) {
  paired_rows_kernel<TC, TR, A><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      static_cast<const TC*>(logits), static_cast<const TR*>(ref), labels, kl_valid, static_cast<const A*>(scales),
      n_ce, vocab, static_cast<A>(1.0 / temperature), ignore_index, reverse, static_cast<A*>(per_row),
      static_cast<TC*>(grad));
  return cudaGetLastError();
}

template <typename TC>
cudaError_t launch_ref(Dtype ref_dtype, const void* logits, const void* ref, const int64_t* labels,
                       const bool* kl_valid, const void* scales, int64_t n_rows, int64_t n_ce, int64_t vocab,
                       double temperature, int64_t ignore_index, bool reverse, void* per_row, void* grad,
                       cudaStream_t stream) {
  switch (ref_dtype) {
    case Dtype::kFloat32:
      return launch<TC, float, float>(logits, ref, labels, kl_valid, scales, n_rows, n_ce, vocab, temperature,
                                      ignore_index, reverse, per_row, grad, stream);
    case Dtype::kFloat16:
      return launch<TC, __half, float>(logits, ref, labels, kl_valid, scales, n_rows, n_ce, vocab, temperature,
                                       ignore_index, reverse, per_row, grad, stream);
    case Dtype::kBFloat16:
      return launch<TC, BF16Bits, float>(logits, ref, labels, kl_valid, scales, n_rows, n_ce, vocab, temperature,
                                         ignore_index, reverse, per_row, grad, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t paired_rows(const void* logits, Dtype logits_dtype, const void* ref, Dtype ref_dtype,
                        const int64_t* labels, const bool* kl_valid, const void* scales, int64_t n_rows, int64_t n_ce,
                        int64_t vocab, double temperature, int64_t ignore_index, bool reverse, void* per_row,
                        void* grad, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x limit
  if ((logits_dtype == Dtype::kFloat64) != (ref_dtype == Dtype::kFloat64)) return cudaErrorInvalidValue;
  switch (logits_dtype) {
    case Dtype::kFloat64:
      return launch<double, double, double>(logits, ref, labels, kl_valid, scales, n_rows, n_ce, vocab, temperature,
                                            ignore_index, reverse, per_row, grad, stream);
    case Dtype::kFloat32:
      return launch_ref<float>(ref_dtype, logits, ref, labels, kl_valid, scales, n_rows, n_ce, vocab, temperature,
                               ignore_index, reverse, per_row, grad, stream);
    case Dtype::kFloat16:
      return launch_ref<__half>(ref_dtype, logits, ref, labels, kl_valid, scales, n_rows, n_ce, vocab, temperature,
                                ignore_index, reverse, per_row, grad, stream);
    case Dtype::kBFloat16:
      return launch_ref<BF16Bits>(ref_dtype, logits, ref, labels, kl_valid, scales, n_rows, n_ce, vocab,
                                  temperature, ignore_index, reverse, per_row, grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace seat::cuda
