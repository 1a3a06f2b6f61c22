// CPU kernel of dequant4_delta (seat_C::dequant4_delta_): a bitsandbytes 4-bit weight
// dequantized into `out` with a sparse delta added at a mask's entries, in one pass.
// OpenMP over tiles of the output; each tile is dequantized (per quantization block the
// 16 values code[k] * scale in the output dtype, then one lookup per element: byte
// shuffles on AVX2 CPUs, expand_block) and gets the delta entries that fall in it while it is still in cache. The
// mask encoding is a policy (seat/masks.h) finding a tile's entries: int32 indices by
// binary search, block16 from its block's entries and offsets, full as the tile itself,
// hash masks whole mask blocks at a time (a tile holds whole mask blocks; membership
// hashed 8 lanes at a time, member_words.h). The element
// math is seat/dequant4.h. Inputs were validated by python/seat/ops/dequant4_delta.py;
// the TORCH_CHECKs guard direct callers, and no position or slot outside the tensors is
// ever touched, whatever the mask holds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "isa.h"
#include "mask_ref.h"
#include "member_words.h"
#include "seat/dequant4.h"
#include "seat/masks.h"

namespace {

using seat::HashMask;
using seat::MaskRef;
using seat::Quant4Ref;
using seat::cpu::member_words;
using seat::cpu::MemberWords;
using seat::cpu::words_of;

// Elements per tile: a multiple of every bnb block size (<= 4096) and of 2 (whole bytes),
// inside one 65536-element block16 block; 32 KiB of bf16, cache-resident while its
// entries are added. Hash masks with larger blocks use one mask block per tile.
constexpr int64_t kTile = 16384;

// The fp32 scale of quantization block b.
template <bool NESTED>
inline float block_scale(const Quant4Ref& q, int64_t b) {
  if constexpr (NESTED) {
    const uint8_t a = static_cast<const uint8_t*>(q.absmax)[b];
    // volatile: the product is rounded to fp32 before the offset is added, as bnb does,
    // even where the compiler would contract the two into a fused multiply-add
    volatile float product = q.nested_code[a] * q.nested_absmax[b / q.nested_blocksize];
    return product + q.offset;
  } else {
    return static_cast<const float*>(q.absmax)[b];
  }
}

// One quantization block: dst[j] = Out(code[nibble j] * scale), the high nibble of each
// byte first (bitsandbytes' order), n elements from the packed bytes at src.
template <typename Out>
using ExpandBlock = void (*)(const uint8_t* src, int64_t n, const float* code, float scale, Out* dst);

// The portable copy: the block's 16 values once, then one lookup per element.
template <typename Out>
void expand_block_scalar(const uint8_t* src, int64_t n, const float* code, float scale, Out* dst) {
  Out table[16];
  for (int k = 0; k < 16; ++k) table[k] = static_cast<Out>(code[k] * scale);
  const int64_t pairs = n / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    const uint8_t byte = src[i];
    dst[2 * i] = table[byte >> 4];
    dst[2 * i + 1] = table[byte & 0xF];
  }
  if (n & 1) dst[n - 1] = table[src[pairs] >> 4];
}

#ifdef SEAT_CPU_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The AVX2 copy, bit for bit the scalar one: the 16 values code[k] * scale in two vectors,
// rounded to Out as static_cast<Out> rounds (round to nearest even; bf16 NaN -> 0x7FC0),
// split into sizeof(Out) byte planes (plane k: byte k of every value), each a 16-byte
// shuffle table indexed by the codes; 32 elements per 16 packed bytes.
namespace avx2 {
inline __m256i bf16_bits(__m256 v) {  // c10::BFloat16(float) on 8 lanes, in the low halves
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// The 16 values' byte planes: planes[k] byte e = byte k of value e.
template <typename Out>
void value_planes(const float* code, float scale, __m128i* planes) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(code), s), hi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), s);
  if constexpr (sizeof(Out) == 4) {
    alignas(32) float v[16];
    _mm256_store_ps(v, lo);
    _mm256_store_ps(v + 8, hi);
    // per 4 values: their bytes transposed (byte 0 of each, then byte 1, ...)
    const __m128i t = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m128i q[4];
    for (int g = 0; g < 4; ++g) q[g] = _mm_shuffle_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(v + 4 * g)), t);
    // q[g] dword k = byte k of values 4g..4g+3: transpose the 4 x 4 dwords
    const __m128i a0 = _mm_unpacklo_epi32(q[0], q[1]), a1 = _mm_unpackhi_epi32(q[0], q[1]);
    const __m128i a2 = _mm_unpacklo_epi32(q[2], q[3]), a3 = _mm_unpackhi_epi32(q[2], q[3]);
    planes[0] = _mm_unpacklo_epi64(a0, a2);
    planes[1] = _mm_unpackhi_epi64(a0, a2);
    planes[2] = _mm_unpacklo_epi64(a1, a3);
    planes[3] = _mm_unpackhi_epi64(a1, a3);
  } else {
    __m128i h[2];  // the 16 two-byte values
    if constexpr (std::is_same_v<Out, c10::Half>) {
      h[0] = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      h[1] = _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m256i packed = _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi));  // lanes: lo0-3 hi0-3 lo4-7 hi4-7
      const __m256i ordered = _mm256_permute4x64_epi64(packed, 0xD8);           // lo0-7 hi0-7
      h[0] = _mm256_castsi256_si128(ordered);
      h[1] = _mm256_extracti128_si256(ordered, 1);
    }
    const __m128i t = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m128i g0 = _mm_shuffle_epi8(h[0], t), g1 = _mm_shuffle_epi8(h[1], t);  // low bytes, high bytes
    planes[0] = _mm_unpacklo_epi64(g0, g1);
    planes[1] = _mm_unpackhi_epi64(g0, g1);
  }
}

template <typename Out>
void expand_block(const uint8_t* src, int64_t n, const float* code, float scale, Out* dst) {
  constexpr int kBytes = sizeof(Out);
  if constexpr (kBytes != 2 && kBytes != 4) {
    expand_block_scalar(src, n, code, scale, dst);
  } else {
    __m128i t[kBytes];
    value_planes<Out>(code, scale, t);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    int64_t i = 0;
    for (; 2 * i + 32 <= n; i += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble), lo = _mm_and_si128(b, nibble);
      const __m128i codes[2] = {_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)};  // element order
      for (int h = 0; h < 2; ++h) {
        __m128i* out = reinterpret_cast<__m128i*>(dst + 2 * i + 16 * h);
        const __m128i b0 = _mm_shuffle_epi8(t[0], codes[h]), b1 = _mm_shuffle_epi8(t[1], codes[h]);
        if constexpr (kBytes == 2) {
          _mm_storeu_si128(out, _mm_unpacklo_epi8(b0, b1));
          _mm_storeu_si128(out + 1, _mm_unpackhi_epi8(b0, b1));
        } else {
          const __m128i b2 = _mm_shuffle_epi8(t[2], codes[h]), b3 = _mm_shuffle_epi8(t[3], codes[h]);
          const __m128i w01_lo = _mm_unpacklo_epi8(b0, b1), w01_hi = _mm_unpackhi_epi8(b0, b1);
          const __m128i w23_lo = _mm_unpacklo_epi8(b2, b3), w23_hi = _mm_unpackhi_epi8(b2, b3);
          _mm_storeu_si128(out, _mm_unpacklo_epi16(w01_lo, w23_lo));
          _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(w01_lo, w23_lo));
          _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(w01_hi, w23_hi));
          _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(w01_hi, w23_hi));
        }
      }
    }
    if (2 * i < n) expand_block_scalar(src + i, n - 2 * i, code, scale, dst + 2 * i);
  }
}
}  // namespace avx2
#pragma GCC pop_options
#endif

// The copy for this process (seat::cpu::cpu_isa(); AVX-512 CPUs run the AVX2 copy).
template <typename Out>
ExpandBlock<Out> block_expander() {
#ifdef SEAT_CPU_ISA_COPIES
  if (seat::cpu::cpu_isa() != seat::cpu::Isa::kBaseline) return avx2::expand_block<Out>;
#endif
  return expand_block_scalar<Out>;
}

// Elements [begin, end) of the weight into out (begin a multiple of the block size).
template <typename Out, bool NESTED>
void dequantize_tile(const Quant4Ref& q, int64_t begin, int64_t end, ExpandBlock<Out> expand, Out* out) {
  for (int64_t b0 = begin; b0 < end; b0 += q.blocksize) {
    const int64_t n = std::min(b0 + q.blocksize, end) - b0;
    expand(q.packed + b0 / 2, n, q.code, block_scale<NESTED>(q, b0 / q.blocksize), out + b0);
  }
}

// f(position, slot) for the mask's entries with positions in [begin, end), a tile;
// `words`: scratch of words_of(m.block) membership words (hash masks only).
template <typename P>
struct TileEntries {
  template <typename F>
  static void run(const MaskRef& m, int64_t begin, int64_t end, MemberWords, uint32_t*, F&& f) {
    int64_t lo, hi;
    P::tile_slots(m, begin, end, &lo, &hi);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t pos = P::tile_position(m, begin, j);
      if (pos >= begin && pos < end) f(pos, j);
    }
  }
};

// A tile of whole mask blocks (begin and end multiples of m.block, or end == numel). The
// entries of HashMask::visit: each block's membership bits (8 hashes per instruction with
// AVX2), its members by bit scans, numbered from block_offsets[b] and below the next
// block's first slot (or nnz).
template <>
struct TileEntries<HashMask> {
  template <typename F>
  static void run(const MaskRef& m, int64_t begin, int64_t end, MemberWords member_words_fn, uint32_t* words,
                  F&& f) {
    for (int64_t b = begin / m.block; b < m.n_blocks && b * m.block < end; ++b) {
      int64_t slot = m.index[b];
      const int64_t limit = std::min<int64_t>(m.index[b + 1], m.nnz);
      if (slot < 0 || slot >= limit) continue;
      const int64_t first = b * m.block, len = std::min(m.block, m.numel - first);
      member_words_fn(m.key, first, len, m.threshold, words);
      for (int64_t w = 0; w < words_of(len) && slot < limit; ++w) {
        for (uint32_t word = words[w]; word != 0 && slot < limit; word &= word - 1) {
          f(first + w * 32 + __builtin_ctz(word), slot++);
        }
      }
    }
  }
};

template <typename P, typename Out, bool NESTED>
void dequant4_delta(const Quant4Ref& q, const MaskRef& m, const Out* delta, Out* out) {
  const bool hash = std::is_same<P, HashMask>::value;
  const int64_t tile = hash ? std::max(kTile, m.block) : kTile;
  const int64_t tiles = (q.numel + tile - 1) / tile;
  // chosen on this thread: the first call may throw (a bad SEAT_CPU_ISA), never inside
  // the OpenMP region
  const MemberWords member_words_fn = hash && m.nnz > 0 ? member_words() : nullptr;
  const ExpandBlock<Out> expand = block_expander<Out>();
#pragma omp parallel if (tiles > 1) num_threads(at::get_num_threads())
  {
    std::vector<uint32_t> words(hash ? static_cast<size_t>(words_of(m.block)) : 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t begin = t * tile, end = std::min(begin + tile, q.numel);
      dequantize_tile<Out, NESTED>(q, begin, end, expand, out);
      if (m.nnz == 0) continue;
      TileEntries<P>::run(m, begin, end, member_words_fn, words.data(), [=](int64_t pos, int64_t slot) {
        out[pos] = static_cast<Out>(static_cast<float>(out[pos]) + static_cast<float>(delta[slot]));
      });
    }
  }
}

void check_cpu(const at::Tensor& t, const char* name, const char* who) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), who, ": ", name, " must be a contiguous CPU tensor");
}

void check_sized(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name, const char* who) {
  check_cpu(t, name, who);
  TORCH_CHECK(t.scalar_type() == dtype && t.numel() == numel, who, ": ", name, " must hold ", numel, " ", dtype,
              " values; got ", t.numel(), " ", t.scalar_type());
}

void dequant4_delta_cpu(at::Tensor out, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                        int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code, int64_t nested_blocksize, double offset,
                        const at::Tensor& delta, int64_t encoding, const at::Tensor& mask_index,
                        const at::Tensor& mask_offsets, at::IntArrayRef mask_ints) {
  constexpr const char* who = "dequant4_delta_ CPU kernel";
  check_cpu(out, "out", who);
  const int64_t numel = out.numel();
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, who,
              ": out must be float32, float16 or bfloat16");
  TORCH_CHECK(blocksize >= seat::kMinQuantBlock && blocksize <= seat::kMaxQuantBlock &&
                  (blocksize & (blocksize - 1)) == 0,
              who, ": blocksize must be a power of two in [32, 4096]; got ", blocksize);
  const int64_t n_blocks = seat::n_quant_blocks(numel, blocksize);
  const bool nested = nested_absmax.has_value();
  check_sized(packed, at::kByte, (numel + 1) / 2, "packed", who);
  check_sized(absmax, nested ? at::kByte : at::kFloat, n_blocks, "absmax", who);
  check_sized(code, at::kFloat, 16, "code", who);
  Quant4Ref q{packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(), nullptr, nullptr, numel,
              blocksize, 1, static_cast<float>(offset)};
  if (nested) {
    TORCH_CHECK(nested_code.has_value() && nested_blocksize > 0, who,
                ": double quantization needs nested_code and a positive nested_blocksize");
    check_sized(*nested_absmax, at::kFloat, seat::n_quant_blocks(n_blocks, nested_blocksize), "nested_absmax", who);
    check_sized(*nested_code, at::kFloat, 256, "nested_code", who);
    q.nested_absmax = nested_absmax->data_ptr<float>();
    q.nested_code = nested_code->data_ptr<float>();
    q.nested_blocksize = nested_blocksize;
  }
  check_cpu(delta, "delta", who);
  TORCH_CHECK(delta.dim() == 1 && delta.scalar_type() == dtype, who, ": delta must be 1-D of out's dtype");
  TORCH_CHECK(mask_ints.size() == seat::kMaskInts, who, ": mask_ints must hold ", seat::kMaskInts, " ints");
  if (numel == 0) return;
  seat::cpu::dispatch_encoding(encoding, who, [&](auto policy) {
    using P = decltype(policy);
    const MaskRef m = seat::cpu::mask_ref(policy, mask_index, mask_offsets, mask_ints, numel, delta.numel(), who);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequant4_delta_cpu", [&] {
      const scalar_t* d = delta.numel() ? delta.data_ptr<scalar_t>() : nullptr;
      if (nested) {
        dequant4_delta<P, scalar_t, true>(q, m, d, out.data_ptr<scalar_t>());
      } else {
        dequant4_delta<P, scalar_t, false>(q, m, d, out.data_ptr<scalar_t>());
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(seat_C, CPU, m) { m.impl("dequant4_delta_", &dequant4_delta_cpu); }
