// info_scores on the CPU: float64 Gram matrix + LAPACK eigh per image (exact), or a seeded randomized
// range finder (rank > 0). Images run in parallel; the linear algebra of one image runs single-threaded
// inside the parallel region, which also makes the result independent of the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../kernels.h"
#include "../philox.h"
#include "rows.h"

namespace tokencarve {
namespace {

// Lower triangle of a a^T for a [n, k]: eigh reads only the lower triangle, so row panels skip the
// blocks above the diagonal (about 35% fewer flops than the full product at n = 576).
at::Tensor gram_lower(const at::Tensor& a) {
  constexpr int64_t kPanels = 4;
  const int64_t n = a.size(0);
  at::Tensor g = at::zeros({n, n}, a.options());
  for (int64_t p = 0; p < kPanels; ++p) {
    const int64_t lo = n * p / kPanels, hi = n * (p + 1) / kPanels;
    if (hi == lo) continue;
    at::Tensor panel = g.slice(0, lo, hi).slice(1, 0, hi);
    at::mm_out(panel, a.slice(0, lo, hi), a.slice(0, 0, hi).t());
  }
  return g;
}

// x [Nv, D] float64 with non-finite rows zeroed -> c [Nv] float64.
at::Tensor exact_scores(const at::Tensor& x) {
  const int64_t num_visual = x.size(0), dim = x.size(1);
  if (num_visual <= dim) {
    auto [evals, evecs] = at::linalg_eigh(gram_lower(x), "L");
    return (evecs.abs() * evals.clamp_min(0.0).sqrt().unsqueeze(0)).sum(1);
  }
  // Nv > D: the D x D Gram and the coordinates X V; the cost grows linearly in Nv.
  auto [evals, evecs] = at::linalg_eigh(gram_lower(x.t().contiguous()), "L");
  return at::mm(x, evecs).abs().sum(1);
}

at::Tensor orthonormal_basis(const at::Tensor& y) { return std::get<0>(at::linalg_qr(y)); }

// x [Nv, D] float64, omega [D, l] float64 -> c [Nv] float64 from the top-k directions.
at::Tensor randomized_scores(const at::Tensor& x, const at::Tensor& omega, int64_t k) {
  const int64_t cols = omega.size(1);
  at::Tensor y = at::mm(x, omega);
  for (int64_t it = 0; it < kPowerIterations; ++it) {
    y = at::mm(x, orthonormal_basis(at::mm(x.t(), orthonormal_basis(y))));
  }
  const at::Tensor basis = orthonormal_basis(y);        // [Nv, l]
  const at::Tensor small = at::mm(basis.t(), x);        // [l, D]
  auto [evals, evecs] = at::linalg_eigh(at::mm(small, small.t()));
  evals = evals.narrow(0, cols - k, k);
  evecs = evecs.narrow(1, cols - k, k);
  return (at::mm(basis, evecs) * evals.clamp_min(0.0).sqrt().unsqueeze(0)).abs().sum(1);
}

// One image [Nv, D] as float64 in one pass; a row holding NaN or +-Inf becomes zero and finite[row] = 0.
template <typename scalar_t>
at::Tensor to_double_zeroing_nonfinite(const scalar_t* image, int64_t num_visual, int64_t dim, char* finite) {
  at::Tensor x = at::empty({num_visual, dim}, at::kDouble);
  double* dst = x.data_ptr<double>();
  for (int64_t i = 0; i < num_visual; ++i) {
    std::transform(image + i * dim, image + (i + 1) * dim, dst + i * dim,
                   [](scalar_t v) { return static_cast<double>(v); });
    finite[i] = zero_if_nonfinite(dst + i * dim, dim);
  }
  return x;
}

at::Tensor gaussian_sketch(int64_t seed, int64_t rows, int64_t cols) {
  at::Tensor omega = at::empty({rows, cols}, at::kFloat);
  float* out = omega.data_ptr<float>();
  at::parallel_for(0, rows * cols, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = philox_normal(static_cast<uint64_t>(seed), static_cast<uint32_t>(i));
  });
  return omega;
}

}  // namespace

at::Tensor info_scores_cpu(const at::Tensor& hidden, int64_t rank, int64_t seed) {
  check_info_scores(hidden, rank, seed);
  const int64_t batch = hidden.size(0), num_visual = hidden.size(1), dim = hidden.size(2);
  at::Tensor out = at::empty({batch, num_visual}, hidden.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t k = std::min(rank, std::min(num_visual, dim));
  const at::Tensor omega =
      rank > 0 ? gaussian_sketch(seed, dim, sketch_cols(num_visual, dim, rank)).to(at::kDouble) : at::Tensor();

  const at::Tensor h = hidden.contiguous();
  float* out_ptr = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "tokencarve_info_scores_cpu", [&] {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<char> finite(num_visual);
      for (int64_t b = begin; b < end; ++b) {
        const at::Tensor x = to_double_zeroing_nonfinite(h.data_ptr<scalar_t>() + b * num_visual * dim, num_visual,
                                                         dim, finite.data());
        const at::Tensor c = (rank > 0 ? randomized_scores(x, omega, k) : exact_scores(x)).contiguous();
        const double* c_ptr = c.data_ptr<double>();
        for (int64_t i = 0; i < num_visual; ++i)
          out_ptr[b * num_visual + i] = finite[i] ? static_cast<float>(c_ptr[i]) : NAN;
      }
    });
  });
  return out;
}

}  // namespace tokencarve
