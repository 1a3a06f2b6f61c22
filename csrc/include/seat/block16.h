// Block16-encoded explicit masks, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels; the same decoding as python/seat/ops/block16_masks.py and
// seat_kernels/block16_masks.py.
//
// A mask's sorted flat indices are stored as block_starts (int32, n_blocks + 1 entries:
// block_starts[b] = entries before element b * 65536) and offsets (uint16, one per entry:
// its index minus 65536 * its block): 2 bytes per entry. Compact slot j is the j-th
// entry, as with int32 indices. Plain C++ (no torch headers).
#pragma once
#include <cstdint>

#include "seat/common.h"

namespace seat {

constexpr int64_t kBlock16 = 65536;

SEAT_HD int64_t block16_n_blocks(int64_t numel) { return (numel + kBlock16 - 1) / kBlock16; }

// The flat position of compact entry j (0 <= j < block_starts[n_blocks]): its block is the
// largest b with block_starts[b] <= j, found by binary search (at most 15 steps for
// numel < 2**31; empty blocks, whose start equals the next one's, are skipped).
SEAT_HD int64_t block16_position(const int32_t* block_starts, const uint16_t* offsets, int64_t n_blocks, int64_t j) {
  int64_t lo = 0, hi = n_blocks;  // block_starts[lo] <= j < block_starts[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (block_starts[mid] <= j) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo * kBlock16 + offsets[j];
}

}  // namespace seat
