// Gaussian sketch entries regenerated from (seed, offset): Philox4x32-10 and a Box-Muller transform in double,
// python_ref.gaussian_sketch's formula (and the Triton kernel's `_gaussian`). The Philox words are integers, the
// uniforms exact in double; only log/cos (glibc here, libdevice in CUDA code) are not correctly rounded, so an
// entry can differ from another library's only if its double value lies within ~1e-16 relative of a float32
// rounding boundary (a few entries in 10^9). Built with -ffp-contract=off / --fmad=false (setup.py), though no
// product here feeds an addition that could be contracted.
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
  const double u1 = (static_cast<double>(c0) + 1.0) * 0x1p-32;  // (0, 1]: no log(0)
  const double u2 = static_cast<double>(c1) * 0x1p-32;          // [0, 1)
  const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  return static_cast<float>(z);
}

}  // namespace tokencarve
