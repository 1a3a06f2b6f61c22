// dequant4_delta's element math, shared by the CPU (csrc/cpu/dequant4.cpp) and CUDA
// (csrc/cuda/dequant4.cu) kernels; the same formula as python/seat/ops/dequant4_delta.py
// (the reference) and seat_kernels/dequant4.py. Plain C++ (no torch headers).
//
// A bitsandbytes 4-bit weight of numel elements: packed[i / 2] holds element i in its high
// nibble when i is even, in its low nibble when odd (bnb's layout); element i is
// code[nibble] * scale(i / blocksize) in fp32, rounded once to the output dtype. With
// double quantization (NESTED), scale(b) = nested_code[absmax[b]] * nested_absmax[b /
// nested_blocksize] + offset, the product rounded to fp32 before the offset is added (bnb:
// dequantize_blockwise, then += offset): never a fused multiply-add, which would round
// once and differ in the last bit.
#pragma once
#include <cstdint>

#include "seat/common.h"

namespace seat {

// The quantization state as the kernels read it (nested_* unused unless NESTED).
struct Quant4Ref {
  const uint8_t* packed;        // ceil(numel / 2) bytes
  const void* absmax;           // n_blocks float32, or uint8 when nested
  const float* code;            // 16 float32
  const float* nested_absmax;   // ceil(n_blocks / nested_blocksize) float32
  const float* nested_code;     // 256 float32
  int64_t numel;
  int64_t blocksize;            // a power of two in [32, 4096]
  int64_t nested_blocksize;
  float offset;
};

// Output dtypes of dequant4_delta.
constexpr int64_t kMinQuantBlock = 32, kMaxQuantBlock = 4096;

SEAT_HD int64_t n_quant_blocks(int64_t numel, int64_t blocksize) { return (numel + blocksize - 1) / blocksize; }

SEAT_HD uint32_t nibble(const uint8_t* packed, int64_t i) {
  const uint32_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0xFu) : (byte >> 4);
}

}  // namespace seat
