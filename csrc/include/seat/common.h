// Shared between the C++ CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
// Plain C++: no torch headers, so .cu files that include it compile quickly.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SEAT_HD __host__ __device__ __forceinline__
#else
#define SEAT_HD inline
#endif

namespace seat {

// Element types a kernel launcher can be asked for. The torch-side binding maps
// at::ScalarType onto these so kernel translation units never include ATen.
enum class Dtype : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Element-wise step of masked_swap_: exchange two values bit for bit (the caller picks
// an unsigned integer type of the element's width, so NaN payloads survive).
template <typename Bits>
SEAT_HD void swap_bits(Bits* a, Bits* b) {
  Bits t = *a;
  *a = *b;
  *b = t;
}

// 32-bit integer hash (Mueller's): the counter-based random bits of stochastic rounding
// (seat/adamw.h) and the membership test of hash masks (seat/masks.h).
SEAT_HD uint32_t mix32(uint32_t x) {
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  return (x >> 16) ^ x;
}

}  // namespace seat
