// Small float32 math shared by the compiled kernels (interval.cpp, decode.cpp), written so that the compiler
// vectorises the loops that call it. native.build_library hashes this header into the cache key of every
// library that includes it (native.source_digest), so an edit here rebuilds them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace salience_math {

// exp(x) for x <= ~0 (scores minus their row's maximum or logsumexp): x = n ln2 + r with |r| <= ln2 / 2, a
// degree-7 polynomial for exp(r), then 2^n from the exponent bits. Relative error about 2 ulp; 0 below -87
// (where float exp underflows anyway).
inline float exp_neg(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;  // ln2 split in two so that n * hi is exact
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}

}  // namespace salience_math
