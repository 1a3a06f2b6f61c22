// torch side of the CUDA bindings: map at::ScalarType onto the launchers' seat::Dtype.
// (Included by the *_bind.cpp files only: the .cu files stay free of torch headers.)
#pragma once
#include <ATen/ATen.h>

#include "seat/common.h"

namespace seat {

inline Dtype to_seat_dtype(at::ScalarType t, const char* who) {
  switch (t) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK(false, who, ": unsupported dtype ", t);
  }
}

}  // namespace seat
