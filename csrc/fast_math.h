// Vectorizable math for the CPU kernels' row loops.
//
// glibc's expf is a scalar call, so a loop over it never vectorizes. fast_exp is
// branch-free: GCC vectorizes loops over it when the translation unit is compiled
// with no-trapping-math (otherwise it may not if-convert the clamps; see the pragma at
// the top of dino_loss.cpp and attention.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_isa.h"

namespace smsd {

// exp(x) = 2^n exp(r), |r| <= ln2 / 2, degree-7 polynomial (rel. error ~1e-8 before
// rounding). NaN stays NaN; x < -87 gives 0 (exp(-inf) = 0).
SMSD_INLINE float fast_exp(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < -87.0f ? 0.0f : y;
}

}  // namespace smsd
