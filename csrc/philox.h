// Gaussian sketch entries regenerated from (seed, offset): Philox4x32-10 and a float32 Box-Muller
// transform, the same stream as Triton's `tl.randn(seed, offset)` and python_ref.gaussian_sketch.
#pragma once

#include <cmath>
#include <cstdint>

namespace tokencarve {

#if defined(__CUDACC__)
#define TOKENCARVE_HOST_DEVICE __host__ __device__
#else
#define TOKENCARVE_HOST_DEVICE
#endif

TOKENCARVE_HOST_DEVICE inline float philox_normal(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // uint -> uniform float in [0, 1), as Triton's uint_to_uniform_float.
  auto uniform = [](uint32_t bits) {
    int32_t x = static_cast<int32_t>(bits);
    if (x < 0) x = ~x;
    return static_cast<float>(x) * 4.6566127342e-10f;
  };
  const float u1 = std::fmax(1.0e-7f, uniform(c0));
  const float theta = 6.283185307179586f * uniform(c1);
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * std::cos(theta);
}

}  // namespace tokencarve
