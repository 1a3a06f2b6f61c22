// The mask encodings of the sparse-update ops as compile-time policies, shared by the
// CPU (csrc/cpu) and CUDA (csrc/cuda) kernels; the same decoding as
// python/seat/ops/_encodings.py (the oracle) and seat_kernels/sparse_update.py.
//
// Every operation (gather, swap, AdamW) is written once over a policy P, which says how
// to walk one parameter's trained entries: P::work_items(m) independent items, and
// P::visit(m, item, f) calls f(position, slot) for the entries of one item (position:
// flat index into the parameter; slot: index into the compact arrays); P::position(m, j)
// gives entry j's position for one-thread-per-entry kernels. An op never switches on the
// encoding. A backend may walk a policy its own way where the generic walk is slow, with
// the same entries and bounds: the CPU turns every encoding into runs of int32 positions,
// hashing a hash block 16 or 8 lanes at a time (csrc/cpu/sparse_update.cpp), CUDA numbers a hash block's members with a
// warp ballot (csrc/cuda/sparse_update.cu); visit() stays the definition they follow,
// and so do the Triton kernels (seat_kernels/sparse_update.py).
//
//   IndexMask    sorted unique int32 flat indices; one item per entry.
//   Block16Mask  index = block_starts (int32, n_blocks + 1: entries before element
//                b * 65536), offsets = uint16 per entry (its index minus 65536 * its
//                block); one item per block of 65536 elements (no search). position(j)
//                finds entry j's block by binary search, for one-thread-per-entry kernels.
//   HashMask     element e is trained iff mix32(key ^ mix32(e)) < threshold (threshold
//                in [0, 2**32]); index = block_offsets (int32, n_blocks + 1: members
//                before each block of `block` elements); one item per block, whose
//                members are recomputed in order and numbered from its first slot.
//   FullMask     every element in order: position = slot = j (a compact parameter
//                trained whole); index empty, nnz == numel; one item per entry.
//
// Tiles (dequant4_delta): P::tile_slots(m, begin, end, &lo, &hi) gives the slots whose
// entries may lie in positions [begin, end) for the encodings with one item per entry
// (IndexMask: two binary searches of the sorted indices; Block16Mask: [begin, end) inside
// one 65536-element block, the block's entries and a binary search of its offsets;
// FullMask: [begin, end) itself); P::tile_position(m, begin, j) is slot j's position (a
// caller still checks it lies in [begin, end): a mask that lies is skipped, not followed).
// HashMask tiles are whole mask blocks (P::visit).
//
// Bounds: every visit yields slots in [0, nnz) and positions in [0, numel) only, whatever
// the tensors hold (an index or offset outside them is skipped), so a kernel never
// touches memory outside its tensors even when the caller broke the contract.
// Plain C++ (no torch headers).
#pragma once
#include <cstdint>

#include "seat/common.h"

namespace seat {

// Encoding ids: the `encoding` int of the seat_C schemas (python/seat/ops/_encodings.py).
enum class Encoding : int64_t { kIndex = 0, kBlock16 = 1, kHash = 2, kFull = 3 };

// Ints per mask in the schemas' mask_ints: (key, threshold, block) of a HashMask, zeros
// for the others.
constexpr int kMaskInts = 3;
constexpr int64_t kBlock16 = 65536;

// One parameter's mask as every policy reads it (unused fields are zero / null).
struct MaskRef {
  const int32_t* index;     // idx, block_starts or block_offsets
  const uint16_t* offsets;  // block16 offsets (nnz); null otherwise
  int64_t numel;            // elements of the parameter
  int64_t nnz;              // entries of the compact arrays
  int64_t n_blocks;         // blocks of block16 / hash masks (index.numel() - 1)
  int64_t threshold;        // hash: in [0, 2**32]
  int64_t block;            // hash: elements per block, a power of two
  uint32_t key;             // hash: the mask key
};

SEAT_HD int64_t n_blocks_of(int64_t numel, int64_t block) { return (numel + block - 1) / block; }

SEAT_HD bool hash_member(uint32_t key, int64_t e, int64_t threshold) {
  return static_cast<int64_t>(mix32(key ^ mix32(static_cast<uint32_t>(e)))) < threshold;
}

// The first j in [lo, hi) with key(j) >= value (hi if none), for key non-decreasing in j;
// only keys inside [lo, hi) are read, whatever they hold.
template <typename Key>
SEAT_HD int64_t lower_bound(int64_t lo, int64_t hi, int64_t value, const Key& key) {
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (key(mid) < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

struct IndexMask {
  SEAT_HD static int64_t work_items(const MaskRef& m) { return m.nnz; }
  SEAT_HD static int64_t position(const MaskRef& m, int64_t j) { return m.index[j]; }
  template <typename F>
  SEAT_HD static void visit(const MaskRef& m, int64_t j, F&& f) {
    const int64_t pos = m.index[j];
    if (pos >= 0 && pos < m.numel) f(pos, j);
  }
  SEAT_HD static void tile_slots(const MaskRef& m, int64_t begin, int64_t end, int64_t* lo, int64_t* hi) {
    const int32_t* index = m.index;
    auto key = [index](int64_t j) { return static_cast<int64_t>(index[j]); };
    *lo = lower_bound(0, m.nnz, begin, key);
    *hi = lower_bound(*lo, m.nnz, end, key);
  }
  SEAT_HD static int64_t tile_position(const MaskRef& m, int64_t, int64_t j) { return m.index[j]; }
};

struct Block16Mask {
  SEAT_HD static int64_t work_items(const MaskRef& m) { return m.n_blocks; }
  // The flat position of entry j: its block is the largest b with block_starts[b] <= j
  // (binary search, at most 15 steps for numel < 2**31; empty blocks are skipped).
  SEAT_HD static int64_t position(const MaskRef& m, int64_t j) {
    int64_t lo = 0, hi = m.n_blocks;  // block_starts[lo] <= j < block_starts[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) >> 1;
      if (m.index[mid] <= j) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    return lo * kBlock16 + m.offsets[j];
  }
  template <typename F>
  SEAT_HD static void visit(const MaskRef& m, int64_t b, F&& f) {
    const int64_t base = b * kBlock16;
    int64_t begin = m.index[b], end = m.index[b + 1];
    begin = begin < 0 ? 0 : begin;
    end = end > m.nnz ? m.nnz : end;
    if (base + kBlock16 <= m.numel) {  // a whole block: every uint16 offset is inside
      for (int64_t j = begin; j < end; ++j) f(base + m.offsets[j], j);
      return;
    }
    for (int64_t j = begin; j < end; ++j) {
      const int64_t pos = base + m.offsets[j];
      if (pos < m.numel) f(pos, j);
    }
  }
  // [begin, end) inside block begin / 65536.
  SEAT_HD static void tile_slots(const MaskRef& m, int64_t begin, int64_t end, int64_t* lo, int64_t* hi) {
    const int64_t b = begin / kBlock16;
    *lo = *hi = 0;
    if (b >= m.n_blocks) return;
    int64_t first = m.index[b], last = m.index[b + 1];
    first = first < 0 ? 0 : first;
    last = last > m.nnz ? m.nnz : last;
    if (first >= last) return;
    const uint16_t* offsets = m.offsets;
    auto key = [offsets](int64_t j) { return static_cast<int64_t>(offsets[j]); };
    const int64_t base = b * kBlock16;
    *lo = lower_bound(first, last, begin - base, key);
    *hi = lower_bound(*lo, last, end - base, key);
  }
  SEAT_HD static int64_t tile_position(const MaskRef& m, int64_t begin, int64_t j) {
    return begin / kBlock16 * kBlock16 + m.offsets[j];
  }
};

struct HashMask {
  SEAT_HD static int64_t work_items(const MaskRef& m) { return m.n_blocks; }
  // The members of block b in order, numbered from block_offsets[b]; a slot at or past
  // the next block's first slot (or nnz) is skipped, so offsets that disagree with (key,
  // threshold) can make a result wrong but never write out of bounds.
  template <typename F>
  SEAT_HD static void visit(const MaskRef& m, int64_t b, F&& f) {
    const int64_t begin = b * m.block;
    const int64_t end = begin + m.block < m.numel ? begin + m.block : m.numel;
    int64_t slot = m.index[b];
    int64_t limit = m.index[b + 1];
    limit = limit > m.nnz ? m.nnz : limit;
    if (slot < 0) return;
    for (int64_t e = begin; e < end && slot < limit; ++e) {
      if (hash_member(m.key, e, m.threshold)) f(e, slot++);
    }
  }
};

struct FullMask {
  SEAT_HD static int64_t work_items(const MaskRef& m) { return m.nnz; }
  SEAT_HD static int64_t position(const MaskRef&, int64_t j) { return j; }
  template <typename F>
  SEAT_HD static void visit(const MaskRef& m, int64_t j, F&& f) {
    if (j >= 0 && j < m.numel) f(j, j);
  }
  SEAT_HD static void tile_slots(const MaskRef& m, int64_t begin, int64_t end, int64_t* lo, int64_t* hi) {
    const int64_t n = m.nnz < m.numel ? m.nnz : m.numel;
    *lo = begin < n ? begin : n;
    *hi = end < n ? end : n;
  }
  SEAT_HD static int64_t tile_position(const MaskRef&, int64_t, int64_t j) { return j; }
};

}  // namespace seat
