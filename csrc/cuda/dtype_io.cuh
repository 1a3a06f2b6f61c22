// Element I/O of the CUDA kernels by storage dtype, in one place: how an fp16 / bf16 /
// fp32 / fp64 element is read as a wider type, stored back rounded once, and which
// seat/adamw.h ParamIO a parameter dtype uses. Device code only; no torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "seat/adamw.h"
#include "seat/common.h"

namespace seat::cuda {

// The launchers' Dtype of a storage type (the instantiation lists name types; the
// bindings pass Dtype values).
template <typename T>
struct DtypeOf;
template <>
struct DtypeOf<float> { static constexpr Dtype value = Dtype::kFloat32; };
template <>
struct DtypeOf<double> { static constexpr Dtype value = Dtype::kFloat64; };
template <>
struct DtypeOf<__half> { static constexpr Dtype value = Dtype::kFloat16; };
template <>
struct DtypeOf<__nv_bfloat16> { static constexpr Dtype value = Dtype::kBFloat16; };

// One element as Acc; fp16 and bf16 widen exactly through float.
template <typename Acc, typename In>
__device__ __forceinline__ Acc load_as(const In* p) { return static_cast<Acc>(*p); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __half* p) { return static_cast<Acc>(__half2float(*p)); }
template <typename Acc>
__device__ __forceinline__ Acc load_as(const __nv_bfloat16* p) { return static_cast<Acc>(__bfloat162float(*p)); }

// Store v as Out. fp16 / bf16 round once to nearest-even from fp32 (a double is narrowed
// to fp32 first; the kernels only store fp32 sums into half types).
template <typename Out, typename V>
__device__ __forceinline__ void store_as(Out* p, V v) { *p = static_cast<Out>(v); }
template <typename V>
__device__ __forceinline__ void store_as(__half* p, V v) { *p = __float2half_rn(static_cast<float>(v)); }
template <typename V>
__device__ __forceinline__ void store_as(__nv_bfloat16* p, V v) { *p = __float2bfloat16_rn(static_cast<float>(v)); }

// The type a sum destined for Out is formed in: Out itself, fp32 for the half types (so a
// bf16 compact gradient is rounded once per accumulation, not once per operand).
template <typename Out>
struct SumOf { using type = Out; };
template <>
struct SumOf<__half> { using type = float; };
template <>
struct SumOf<__nv_bfloat16> { using type = float; };

// fp16 params for sparse_adamw_entry (seat/adamw.h); bf16 / fp32 / fp64 use the
// host-and-device BF16IO / PlainIO defined there. fp16 has no stochastic rounding.
struct HalfIO {
  using storage = __half;
  template <typename T>
  __device__ static T load(const __half* p) { return load_as<T>(p); }
  template <typename T>
  __device__ static void store(__half* p, T w, bool, uint32_t) { store_as(p, w); }
};

// The ParamIO of a parameter dtype, and whether it honours stochastic rounding.
template <typename Param>
struct ParamIOOf { using type = PlainIO<Param>; static constexpr bool kStochastic = false; };
template <>
struct ParamIOOf<__half> { using type = HalfIO; static constexpr bool kStochastic = false; };
template <>
struct ParamIOOf<__nv_bfloat16> { using type = BF16IO; static constexpr bool kStochastic = true; };

// How a compact gradient of dtype Grad is stored for load_grad (seat/adamw.h): bf16 as
// its raw bits (upcast exactly on load), every other dtype as itself.
template <typename Grad>
struct GradStorageOf { using type = Grad; };
template <>
struct GradStorageOf<__nv_bfloat16> { using type = uint16_t; };

}  // namespace seat::cuda
