// How the CPU kernels take a mask: (encoding, mask_index, mask_offsets, mask_ints) turned
// into a policy (dispatch_encoding, the one switch on the encoding) and a seat::MaskRef
// (mask_ref), after the checks the walks rely on: index and offsets as long as they read
// them, hash parameters in their ranges. The values themselves are checked by the Python
// layer (python/seat/ops/_encodings.py); the walks skip what lies outside the tensors, so
// a direct caller, or a mask edited behind torch's back, cannot reach other memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "seat/masks.h"

namespace seat {
namespace cpu {

// Calls f(policy) with the policy of `encoding`.
template <typename F>
void dispatch_encoding(int64_t encoding, const char* who, F&& f) {
  switch (static_cast<Encoding>(encoding)) {
    case Encoding::kIndex: return f(IndexMask{});
    case Encoding::kBlock16: return f(Block16Mask{});
    case Encoding::kHash: return f(HashMask{});
    case Encoding::kFull: return f(FullMask{});
  }
  TORCH_CHECK(false, who, ": encoding must be 0 (int32), 1 (block16), 2 (hash) or 3 (full); got ", encoding);
}

inline void check_mask_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name,
                              const char* who) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.dim() == 1, who, ": ", name,
              " must be a contiguous 1-D ", dtype, " CPU tensor");
  TORCH_CHECK(t.numel() == numel, who, ": ", name, " must have ", numel, " entries; got ", t.numel());
}

// The MaskRef of one mask of a tensor of `numel` elements with `nnz` compact entries.
inline MaskRef mask_ref(IndexMask, const at::Tensor& index, const at::Tensor&, at::IntArrayRef, int64_t numel,
                        int64_t nnz, const char* who) {
  check_mask_tensor(index, at::kInt, nnz, "the index mask", who);
  return {index.data_ptr<int32_t>(), nullptr, numel, nnz, 0, 0, 0, 0};
}

inline MaskRef mask_ref(Block16Mask, const at::Tensor& index, const at::Tensor& offsets, at::IntArrayRef,
                        int64_t numel, int64_t nnz, const char* who) {
  const int64_t n_blocks = n_blocks_of(numel, kBlock16);
  check_mask_tensor(index, at::kInt, n_blocks + 1, "block_starts (ceil(numel / 65536) + 1 entries)", who);
  check_mask_tensor(offsets, at::kUInt16, nnz, "offsets (one per entry)", who);
  return {index.data_ptr<int32_t>(), static_cast<const uint16_t*>(offsets.data_ptr()), numel, nnz, n_blocks, 0, 0,
          0};
}

inline void check_hash(int64_t numel, int64_t key, int64_t threshold, int64_t block, const char* who) {
  TORCH_CHECK(numel >= 0 && numel <= INT32_MAX, who, ": hash masks reach at most 2**31-1 elements; got ", numel);
  TORCH_CHECK(key >= 0 && key <= UINT32_MAX, who, ": the mask key must be in [0, 2**32); got ", key);
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 32), who, ": threshold must be in [0, 2**32]; got ",
              threshold);
  TORCH_CHECK(block >= 256 && block <= kBlock16 && (block & (block - 1)) == 0, who,
              ": block must be a power of two in [256, 65536]; got ", block);
}

inline MaskRef mask_ref(HashMask, const at::Tensor& index, const at::Tensor&, at::IntArrayRef ints, int64_t numel,
                        int64_t nnz, const char* who) {
  const int64_t key = ints[0], threshold = ints[1], block = ints[2];
  check_hash(numel, key, threshold, block, who);
  const int64_t n_blocks = n_blocks_of(numel, block);
  check_mask_tensor(index, at::kInt, n_blocks + 1, "block_offsets (ceil(numel / block) + 1 entries)", who);
  return {index.data_ptr<int32_t>(), nullptr, numel, nnz, n_blocks, threshold, block, static_cast<uint32_t>(key)};
}

// Every element: the index is empty (it holds no entry) and the compact arrays have one
// entry per element.
inline MaskRef mask_ref(FullMask, const at::Tensor& index, const at::Tensor&, at::IntArrayRef, int64_t numel,
                        int64_t nnz, const char* who) {
  check_mask_tensor(index, at::kInt, 0, "the index of a full mask (empty)", who);
  TORCH_CHECK(nnz == numel, who, ": a full mask has one compact entry per element (", numel, "); got ", nnz);
  return {nullptr, nullptr, numel, nnz, 0, 0, 0, 0};
}

}  // namespace cpu
}  // namespace seat
