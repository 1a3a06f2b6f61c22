// CPU kernel of dequant4_delta (seat_C::dequant4_delta_): a bitsandbytes 4-bit weight
// dequantized into `out` with a sparse delta added at a mask's entries, in one pass.
// OpenMP over tiles of the output; each tile is dequantized (a 16-entry table of
// code[k] * scale in the output dtype per quantization block, then one lookup per
// element) and gets the delta entries that fall in it while it is still in cache. The
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
#include <optional>
#include <type_traits>
#include <vector>

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

// Elements [begin, end) of the weight into out (begin a multiple of the block size).
template <typename Out, bool NESTED>
void dequantize_tile(const Quant4Ref& q, int64_t begin, int64_t end, Out* out) {
  for (int64_t b0 = begin; b0 < end; b0 += q.blocksize) {
    const int64_t n = std::min(b0 + q.blocksize, end) - b0;
    const float scale = block_scale<NESTED>(q, b0 / q.blocksize);
    Out table[16];
    for (int k = 0; k < 16; ++k) table[k] = static_cast<Out>(q.code[k] * scale);
    const uint8_t* src = q.packed + b0 / 2;
    Out* dst = out + b0;
    const int64_t pairs = n / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      const uint8_t byte = src[i];
      dst[2 * i] = table[byte >> 4];
      dst[2 * i + 1] = table[byte & 0xF];
    }
    if (n & 1) dst[n - 1] = table[src[pairs] >> 4];
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
#pragma omp parallel if (tiles > 1) num_threads(at::get_num_threads())
  {
    std::vector<uint32_t> words(hash ? static_cast<size_t>(words_of(m.block)) : 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t begin = t * tile, end = std::min(begin + tile, q.numel);
      dequantize_tile<Out, NESTED>(q, begin, end, out);
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
