// select on the CPU: stable descending ranks of both scores, the fused IPGS score, and the K1 tokens
// with the largest fused score in descending order (SPEC.md stage 0.5 and stage I). One image per task.
// Sorting by (key descending, token index ascending) is a total order, so any sort gives the one answer
// a stable sort gives.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "../kernels.h"

namespace tokencarve {
namespace {

// ranks[i] = position of token i in the descending order of key; non-finite keys rank last.
void descending_ranks(const double* score, int64_t n, std::vector<int64_t>& idx, std::vector<double>& key,
                      std::vector<int64_t>& ranks) {
  for (int64_t i = 0; i < n; ++i) key[i] = std::isfinite(score[i]) ? score[i] : -std::numeric_limits<double>::infinity();
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
  for (int64_t p = 0; p < n; ++p) ranks[idx[p]] = p;
}

}  // namespace

at::Tensor select_cpu(const at::Tensor& attn, const at::Tensor& info, int64_t budget, double attn_weight) {
  check_select(attn, info, budget, attn_weight);
  const int64_t batch = attn.size(0), num_visual = attn.size(1);
  const int64_t k1 = budget_split(num_visual, budget).k1;
  at::Tensor order = at::empty({batch, k1}, attn.options().dtype(at::kLong));
  if (order.numel() == 0) return order;
  const at::Tensor a64 = attn.to(at::kDouble).contiguous();
  const at::Tensor c64 = info.to(at::kDouble).contiguous();
  const double* a_ptr = a64.data_ptr<double>();
  const double* c_ptr = c64.data_ptr<double>();
  int64_t* out = order.data_ptr<int64_t>();
  const double lam = attn_weight, nv = static_cast<double>(num_visual);

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(num_visual), r_a(num_visual), r_c(num_visual);
    std::vector<double> key(num_visual), fused(num_visual);
    for (int64_t b = begin; b < end; ++b) {
      descending_ranks(a_ptr + b * num_visual, num_visual, idx, key, r_a);
      descending_ranks(c_ptr + b * num_visual, num_visual, idx, key, r_c);
      // Two products and one sum, as python_ref.fuse_ranks (built with -ffp-contract=off: no FMA).
      for (int64_t i = 0; i < num_visual; ++i) {
        const double from_attn = lam * (nv - static_cast<double>(r_a[i]));
        const double from_info = (1.0 - lam) * (nv - static_cast<double>(r_c[i]));
        fused[i] = from_attn + from_info;
      }
      std::iota(idx.begin(), idx.end(), int64_t{0});
      std::partial_sort(idx.begin(), idx.begin() + k1, idx.end(), [&](int64_t x, int64_t y) {
        return fused[x] > fused[y] || (fused[x] == fused[y] && x < y);
      });
      std::copy(idx.begin(), idx.begin() + k1, out + b * k1);
    }
  });
  return order;
}

}  // namespace tokencarve
