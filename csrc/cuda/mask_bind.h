// torch side of the CUDA bindings: a mask's (encoding, mask_index, mask_offsets,
// mask_ints) as a seat::MaskRef, after the size checks (mask_layout_error, in
// sparse_update.cu) that keep the kernels' reads inside the mask tensors. Included by the
// *_bind.cpp files only.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "seat/masks.h"
#include "sparse_update.cuh"

namespace seat::cuda {

inline bool is_flat(const at::Tensor& t, const at::Device& device) {
  return t.device() == device && t.is_contiguous() && t.dim() == 1;
}

inline void* ptr_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

// The mask of a parameter of `numel` elements with `nnz` compact entries; mask_layout_error
// holds the sizes to the encoding, so the kernels' reads stay inside the mask tensors.
inline seat::MaskRef mask_ref(int64_t encoding, const at::Tensor& index, const at::Tensor& offsets,
                              const int64_t* ints, int64_t numel, int64_t nnz, const at::Device& device,
                              const char* who) {
  TORCH_CHECK(is_flat(index, device) && index.scalar_type() == at::kInt, who,
              ": mask_index must be a contiguous 1-D int32 tensor on ", device);
  TORCH_CHECK(offsets.numel() == 0 || (is_flat(offsets, device) && offsets.scalar_type() == at::kUInt16), who,
              ": mask_offsets must be empty or a contiguous 1-D uint16 tensor on ", device);
  TORCH_CHECK(ints[0] >= 0 && ints[0] <= std::numeric_limits<uint32_t>::max(), who,
              ": the mask key must be a uint32, got ", ints[0]);
  const seat::MaskRef m{index.data_ptr<int32_t>(),
                        static_cast<const uint16_t*>(ptr_or_null(offsets)),
                        numel,
                        nnz,
                        std::max<int64_t>(index.numel() - 1, 0),
                        ints[1],
                        ints[2],
                        static_cast<uint32_t>(ints[0])};
  const char* error =
      seat::cuda::mask_layout_error(static_cast<seat::Encoding>(encoding), m, index.numel(), offsets.numel());
  TORCH_CHECK(error == nullptr, who, ": ", error);
  return m;
}

inline void check_launch(cudaError_t err, const char* who) {
  TORCH_CHECK(err == cudaSuccess, who, " failed: ", cudaGetErrorString(err));
}

}  // namespace seat::cuda
