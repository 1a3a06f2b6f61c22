// Element I/O of the CPU kernels, beside the torch-free ones of seat/adamw.h (BF16IO,
// PlainIO): what needs c10 types, and how optional tensors travel.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace seat {
namespace cpu {

// fp16 params: load and store through float (no stochastic rounding for fp16).
struct HalfIO {
  using storage = c10::Half;
  template <typename T>
  static T load(const c10::Half* p) { return static_cast<T>(static_cast<float>(*p)); }
  template <typename T>
  static void store(c10::Half* p, T w, bool, uint32_t) { *p = c10::Half(static_cast<float>(w)); }
};

// A type as a value, for generic lambdas that dispatch on several types at once.
template <typename T>
struct Tag {
  using type = T;
};

// Optional state travels as an empty tensor: null then.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

}  // namespace cpu
}  // namespace seat
