// Implicit random masks, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels; the
// same test as python/seat/ops/implicit_masks.py and seat_kernels/implicit_masks.py.
//
// Element e of a parameter is in the mask iff mix32(key ^ mix32(e)) < threshold, where
// key is the 32-bit mask key of (seed, param id) computed on the host and threshold is
// round(density * 2**32) in [0, 2**32] (2**32: every element, so it needs 64 bits). No
// index array exists: the parameter is cut into blocks of `block` elements and
// block_offsets[b] (int32, n_blocks + 1 entries) is the number of members before block
// b, so the member e of block b sits at compact slot block_offsets[b] + (members of
// block b before e). Kernels recompute membership inside a block and count.
// Plain C++ (no torch headers).
#pragma once
#include <cstdint>

#include "seat/common.h"

namespace seat {

SEAT_HD bool implicit_member(uint32_t key, int64_t e, int64_t threshold) {
  return static_cast<int64_t>(mix32(key ^ mix32(static_cast<uint32_t>(e)))) < threshold;
}

SEAT_HD int64_t implicit_n_blocks(int64_t numel, int64_t block) { return (numel + block - 1) / block; }

// The mask of one parameter as the kernels see it.
struct ImplicitMaskRef {
  const int32_t* block_offsets;  // n_blocks + 1 slot offsets
  int64_t numel;                 // elements of the parameter
  int64_t block;                 // elements per block
  int64_t threshold;             // in [0, 2**32]
  uint32_t key;
};

// Visit the members of block b in order: f(e, slot). A slot at or past the next block's
// first slot is skipped, so block_offsets that disagree with (key, threshold) can make a
// result wrong but never write out of bounds.
template <typename F>
SEAT_HD void for_each_member_in_block(const ImplicitMaskRef& m, int64_t b, F&& f) {
  const int64_t begin = b * m.block;
  const int64_t end = begin + m.block < m.numel ? begin + m.block : m.numel;
  int64_t slot = m.block_offsets[b];
  const int64_t limit = m.block_offsets[b + 1];
  for (int64_t e = begin; e < end && slot < limit; ++e) {
    if (implicit_member(m.key, e, m.threshold)) f(e, slot++);
  }
}

}  // namespace seat
