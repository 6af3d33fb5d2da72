// Which vector instruction set the CPU kernels run with, chosen once at run time.
//
// The extension is built without -march flags so that one binary runs on every x86-64
// CPU. The hot row loops are compiled three times (SMSD_TARGET_AVX512, SMSD_TARGET_AVX2,
// baseline SSE2) and each kernel picks its table of functions from cpu_isa(). An AMD
// EPYC without AVX-512 gets the AVX2 bodies; tests and benchmarks force a narrower path
// with SMSD_CPU_ISA=avx2 or SMSD_CPU_ISA=baseline (never a wider one than the CPU has).
#pragma once

namespace smsd {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA in use: the widest the CPU supports, capped by SMSD_CPU_ISA if set.
// An unknown SMSD_CPU_ISA value raises (once, with the accepted names).
Isa cpu_isa();
const char* isa_name(Isa isa);

}  // namespace smsd

#if defined(__GNUC__) && defined(__x86_64__)
#define SMSD_X86_DISPATCH 1
#define SMSD_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma,f16c")))
#define SMSD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SMSD_X86_DISPATCH 0
#define SMSD_TARGET_AVX512
#define SMSD_TARGET_AVX2
#endif

// Helpers are inlined into each ISA's body, so their loops get that body's instructions.
#if defined(__GNUC__)
#define SMSD_INLINE inline __attribute__((always_inline))
#else
#define SMSD_INLINE inline
#endif
