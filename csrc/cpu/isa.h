// Which instruction-set copy the CPU kernels run: the best this CPU supports, or the one
// the SEAT_CPU_ISA environment variable names (baseline, avx2, avx512), read once. Tests
// set it to run every copy the machine can execute; naming one the CPU lacks (or a build
// without that copy) is an error at the kernel's first use.
#pragma once
#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace seat::cpu {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// x86-64 builds with GCC compile the AVX2 / AVX-512 copies; other compilers and CPUs the
// baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEAT_CPU_ISA_COPIES 1
#endif

inline Isa detect_isa() {
  const char* env = std::getenv("SEAT_CPU_ISA");
  const std::string asked = env != nullptr ? env : "";
  TORCH_CHECK(asked.empty() || asked == "baseline" || asked == "avx2" || asked == "avx512",
              "SEAT_CPU_ISA must be baseline, avx2 or avx512 (or unset: the best this CPU runs); got '", asked, "'");
  if (asked == "baseline") return Isa::kBaseline;
#ifdef SEAT_CPU_ISA_COPIES
  __builtin_cpu_init();
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(asked != "avx512" || avx512, "SEAT_CPU_ISA=avx512: this CPU lacks AVX-512 (F, VL, DQ)");
  TORCH_CHECK(asked != "avx2" || avx2, "SEAT_CPU_ISA=avx2: this CPU lacks AVX2 / FMA / F16C");
  if (avx512 && asked != "avx2") return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#else
  TORCH_CHECK(asked.empty(), "SEAT_CPU_ISA=", asked, ": this build has the baseline copy only");
#endif
  return Isa::kBaseline;
}

// The copy for this process (detected on first call).
inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace seat::cpu
