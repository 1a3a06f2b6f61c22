// Hash-mask membership for the CPU walks of hash masks: member_words() (membership as
// 32-bit words: dequant4_delta) and member_positions() (the members' positions: the
// sparse-update kernels), each this CPU's version (AVX-512 / AVX2 where the ISA dispatch
// allows, else scalar), chosen once per process.
#pragma once

#include <climits>
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"
#include "seat/common.h"
#include "seat/masks.h"

namespace seat {
namespace cpu {

// Membership of elements [begin, begin + len) of a hash mask as bits: words[w] bit i is
// element begin + 32 w + i (bits past len are 0). The hash of every element is what bounds
// the hash walks, so the vector versions hash 8 (AVX2) or 16 (AVX-512) elements per
// instruction and turn the comparisons into bits (movemask, mask registers).
// 32-bit membership words covering n elements.
inline int64_t words_of(int64_t n) { return (n + 31) / 32; }

inline void member_words_scalar(uint32_t key, int64_t begin, int64_t len, int64_t threshold, uint32_t* words) {
  const bool all = threshold > static_cast<int64_t>(UINT32_MAX);  // density 1
  const uint32_t below = all ? 0u : static_cast<uint32_t>(threshold);
  for (int64_t w = 0; w < words_of(len); ++w) {
    // 32 flags in a loop the compiler vectorizes (SSE2 / NEON), then packed into bits
    uint8_t flags[32];
    const uint32_t first = static_cast<uint32_t>(begin + w * 32);
    for (uint32_t i = 0; i < 32; ++i) {
      flags[i] = static_cast<uint8_t>(all | (seat::mix32(key ^ seat::mix32(first + i)) < below));
    }
    uint32_t bits = 0;
    for (int i = 0; i < 32; ++i) bits |= static_cast<uint32_t>(flags[i]) << i;
    const int64_t n = len - w * 32;
    words[w] = n >= 32 ? bits : bits & ((uint32_t{1} << n) - 1);
  }
}

#ifdef SEAT_CPU_ISA_COPIES
// seat::mix32 on 8 lanes.
__attribute__((target("avx2"))) inline __m256i mix32x8(__m256i x) {
  const __m256i mul = _mm256_set1_epi32(0x45D9F3B);
  x = _mm256_mullo_epi32(_mm256_xor_si256(_mm256_srli_epi32(x, 16), x), mul);
  x = _mm256_mullo_epi32(_mm256_xor_si256(_mm256_srli_epi32(x, 16), x), mul);
  return _mm256_xor_si256(_mm256_srli_epi32(x, 16), x);
}

__attribute__((target("avx2"))) inline void member_words_avx2(uint32_t key, int64_t begin, int64_t len, int64_t threshold,
                                                       uint32_t* words) {
  if (threshold > static_cast<int64_t>(UINT32_MAX)) {  // density 1: every element
    return member_words_scalar(key, begin, len, threshold, words);
  }
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keys = _mm256_set1_epi32(static_cast<int32_t>(key));
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  // h < threshold as unsigned 32-bit numbers = a signed comparison with both signs flipped
  const __m256i limit = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(threshold))), sign);
  const int64_t n_words = words_of(len);
  for (int64_t w = 0; w < n_words; ++w) {
    uint32_t bits = 0;
    for (int q = 0; q < 4; ++q) {
      const uint32_t first = static_cast<uint32_t>(begin + w * 32 + q * 8);
      const __m256i e = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first)), lanes);
      const __m256i h = mix32x8(_mm256_xor_si256(keys, mix32x8(e)));
      const __m256i below = _mm256_cmpgt_epi32(limit, _mm256_xor_si256(h, sign));
      bits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(below))) << (q * 8);
    }
    words[w] = bits;
  }
  const int64_t tail = len % 32;
  if (tail != 0) words[n_words - 1] &= (uint32_t{1} << tail) - 1;
}

// GCC 12 warns that _mm512_undefined_*() (inside _mm512_srli_epi32, _mm512_sqrt_ps, ...)
// may be used uninitialized: a false positive of those intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// seat::mix32 on 16 lanes.
__attribute__((target("avx512f"))) inline __m512i mix32x16(__m512i x) {
  const __m512i mul = _mm512_set1_epi32(0x45D9F3B);
  x = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(x, 16), x), mul);
  x = _mm512_mullo_epi32(_mm512_xor_si512(_mm512_srli_epi32(x, 16), x), mul);
  return _mm512_xor_si512(_mm512_srli_epi32(x, 16), x);
}

__attribute__((target("avx512f"))) inline void member_words_avx512(uint32_t key, int64_t begin, int64_t len,
                                                                   int64_t threshold, uint32_t* words) {
  if (threshold > static_cast<int64_t>(UINT32_MAX)) return member_words_scalar(key, begin, len, threshold, words);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i keys = _mm512_set1_epi32(static_cast<int32_t>(key));
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(threshold)));
  __m512i e = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(begin)), lanes);
  const __m512i step = _mm512_set1_epi32(16);
  const int64_t n_words = words_of(len);
  for (int64_t w = 0; w < n_words; ++w) {
    const uint32_t lo = _mm512_cmplt_epu32_mask(mix32x16(_mm512_xor_si512(keys, mix32x16(e))), limit);
    e = _mm512_add_epi32(e, step);
    const uint32_t hi = _mm512_cmplt_epu32_mask(mix32x16(_mm512_xor_si512(keys, mix32x16(e))), limit);
    e = _mm512_add_epi32(e, step);
    words[w] = lo | hi << 16;
  }
  const int64_t tail = len % 32;
  if (tail != 0) words[n_words - 1] &= (uint32_t{1} << tail) - 1;
}
#endif

// The positions, relative to `begin`, of the members among elements [begin, begin + len),
// in increasing order, written to rel (which must have room for len + 16 entries: the
// vector versions store 16 lanes at a time); returns how many. `ahead`, when not null, is
// the address of element `begin` of an array the caller is about to walk at these
// positions (elements of `elem_size` bytes): every 16-element group's lines there are
// prefetched as the group is hashed, so the hashing overlaps the memory traffic instead
// of preceding it.
//
// No branch depends on membership: at density 0.05 a group of 16 holds a member about
// half the time, and a branch on it (or a bit-scan loop) mispredicts so often that the
// walk took 4-5x the hashing alone (measured, 2 threads); so every group's lanes are
// compressed and stored and the count advanced by the popcount, and the prefetch goes to
// the group's line whether or not it holds a member (an address computed from the hash
// would wait for it, and the prefetches would trail the walk instead of leading it).
inline void prefetch_group(const char* ahead, int64_t first, int64_t elem_size) {
  if (ahead == nullptr) return;
  __builtin_prefetch(ahead + first * elem_size);
  if (elem_size > 4) __builtin_prefetch(ahead + first * elem_size + 64);  // 16 doubles: two lines
}

inline int64_t member_positions_scalar(uint32_t key, int64_t begin, int64_t len, int64_t threshold, int32_t* rel,
                                       const char* ahead, int64_t elem_size) {
  int64_t count = 0;
  for (int64_t i = 0; i < len; ++i) {
    if (i % 16 == 0) prefetch_group(ahead, i, elem_size);
    rel[count] = static_cast<int32_t>(i);
    count += hash_member(key, begin + i, threshold);
  }
  return count;
}

#ifdef SEAT_CPU_ISA_COPIES
// For each 8-bit membership mask, the lanes of its members in order: the permutation that
// compresses them into the first lanes (AVX2 has no compress instruction).
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
  CompressTable() {
    for (int bits = 0; bits < 256; ++bits) {
      int n = 0;
      for (int i = 0; i < 8; ++i) {
        if (bits >> i & 1) lanes[bits][n++] = i;
      }
      while (n < 8) lanes[bits][n++] = 0;
    }
  }
};

__attribute__((target("avx2"))) inline int64_t member_positions_avx2(uint32_t key, int64_t begin, int64_t len,
                                                                     int64_t threshold, int32_t* rel, const char* ahead,
                                                                     int64_t elem_size) {
  if (threshold > static_cast<int64_t>(UINT32_MAX)) {
    return member_positions_scalar(key, begin, len, threshold, rel, ahead, elem_size);
  }
  static const CompressTable table;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i keys = _mm256_set1_epi32(static_cast<int32_t>(key));
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i limit = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(threshold))), sign);
  const __m256i step = _mm256_set1_epi32(8);
  __m256i e = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(begin)), lanes);
  __m256i at = lanes;  // positions relative to begin
  int64_t count = 0;
  for (int64_t g = 0; g < len; g += 8) {
    if (g % 16 == 0) prefetch_group(ahead, g, elem_size);
    const __m256i h = mix32x8(_mm256_xor_si256(keys, mix32x8(e)));
    uint32_t bits = static_cast<uint32_t>(
        _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, _mm256_xor_si256(h, sign)))));
    if (len - g < 8) bits &= (uint32_t{1} << (len - g)) - 1;
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(table.lanes[bits]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rel + count), _mm256_permutevar8x32_epi32(at, order));
    count += __builtin_popcount(bits);
    e = _mm256_add_epi32(e, step);
    at = _mm256_add_epi32(at, step);
  }
  return count;
}

// 16 lanes: the members' lanes compressed into consecutive entries in registers (a
// compressing store to memory is microcoded on some CPUs).
__attribute__((target("avx512f"))) inline int64_t member_positions_avx512(uint32_t key, int64_t begin, int64_t len,
                                                                         int64_t threshold, int32_t* rel,
                                                                         const char* ahead, int64_t elem_size) {
  if (threshold > static_cast<int64_t>(UINT32_MAX)) {
    return member_positions_scalar(key, begin, len, threshold, rel, ahead, elem_size);
  }
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i keys = _mm512_set1_epi32(static_cast<int32_t>(key));
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(threshold)));
  const __m512i step = _mm512_set1_epi32(16);
  __m512i e = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(begin)), lanes);
  __m512i at = lanes;  // positions relative to begin
  int64_t count = 0;
  for (int64_t g = 0; g < len; g += 16) {
    prefetch_group(ahead, g, elem_size);
    __mmask16 members = _mm512_cmplt_epu32_mask(mix32x16(_mm512_xor_si512(keys, mix32x16(e))), limit);
    if (len - g < 16) members &= static_cast<__mmask16>((1u << (len - g)) - 1);
    _mm512_storeu_si512(rel + count, _mm512_maskz_compress_epi32(members, at));
    count += __builtin_popcount(members);
    e = _mm512_add_epi32(e, step);
    at = _mm512_add_epi32(at, step);
  }
  return count;
}
#pragma GCC diagnostic pop
#endif

using MemberPositions = int64_t (*)(uint32_t, int64_t, int64_t, int64_t, int32_t*, const char*, int64_t);

using MemberWords = void (*)(uint32_t, int64_t, int64_t, int64_t, uint32_t*);

inline MemberWords member_words_for_this_cpu() {
#ifdef SEAT_CPU_ISA_COPIES
  switch (cpu_isa()) {
    case Isa::kAvx512: return member_words_avx512;
    case Isa::kAvx2: return member_words_avx2;
    case Isa::kBaseline: break;
  }
#endif
  return member_words_scalar;
}

inline MemberPositions member_positions_for_this_cpu() {
#ifdef SEAT_CPU_ISA_COPIES
  switch (cpu_isa()) {
    case Isa::kAvx512: return member_positions_avx512;
    case Isa::kAvx2: return member_positions_avx2;
    case Isa::kBaseline: break;
  }
#endif
  return member_positions_scalar;
}

// The membership function for this process. Called on the calling thread before any
// parallel region: the first call may throw (a bad SEAT_CPU_ISA), which must not happen
// inside an OpenMP region (an exception escaping one terminates the process).
inline MemberWords member_words() {
  static const MemberWords chosen = member_words_for_this_cpu();
  return chosen;
}

// The positions function for this process (called as member_words() is).
inline MemberPositions member_positions() {
  static const MemberPositions chosen = member_positions_for_this_cpu();
  return chosen;
}

}  // namespace cpu
}  // namespace seat
