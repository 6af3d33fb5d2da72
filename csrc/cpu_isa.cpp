#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace smsd {
namespace {

Isa detected() {
#if SMSD_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kBaseline;
}

Isa requested(Isa cpu) {
  const char* env = std::getenv("SMSD_CPU_ISA");
  if (env == nullptr || *env == '\0') return cpu;
  const std::string name(env);
  Isa want;
  if (name == "avx512") {
    want = Isa::kAvx512;
  } else if (name == "avx2") {
    want = Isa::kAvx2;
  } else if (name == "baseline") {
    want = Isa::kBaseline;
  } else {
    TORCH_CHECK(false, "SMSD_CPU_ISA=", name, " is not one of avx512, avx2, baseline");
  }
  return static_cast<int>(want) < static_cast<int>(cpu) ? want : cpu;
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = requested(detected());
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace smsd
