// Hash-mask membership as 32-bit words, for the CPU walks of hash masks (the sparse-update
// kernels and dequant4_delta): member_words() is this CPU's version (AVX2 where the ISA
// dispatch allows, else scalar), chosen once per process.
#pragma once

#include <climits>
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"
#include "seat/common.h"

namespace seat {
namespace cpu {

// Membership of elements [begin, begin + len) of a hash mask as bits: words[w] bit i is
// element begin + 32 w + i (bits past len are 0). The hash of every element is what bounds
// the hash walks, so the AVX2 version hashes 8 elements per instruction and turns the
// comparisons into bits with movemask; the members are then found with bit scans.
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
#endif

using MemberWords = void (*)(uint32_t, int64_t, int64_t, int64_t, uint32_t*);

inline MemberWords member_words_for_this_cpu() {
#ifdef SEAT_CPU_ISA_COPIES
  if (cpu_isa() != Isa::kBaseline) return member_words_avx2;
#endif
  return member_words_scalar;
}

// The membership function for this process. Called on the calling thread before any
// parallel region: the first call may throw (a bad SEAT_CPU_ISA), which must not happen
// inside an OpenMP region (an exception escaping one terminates the process).
inline MemberWords member_words() {
  static const MemberWords chosen = member_words_for_this_cpu();
  return chosen;
}

}  // namespace cpu
}  // namespace seat
