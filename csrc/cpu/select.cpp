// select on the CPU: stable descending ranks of both scores, the fused IPGS score, and the K1 tokens
// with the largest fused score in descending order (SPEC.md stage 0.5 and stage I). One image per task.
// Sorting by (key descending, token index ascending) is a total order, so any sort gives the one answer
// a stable sort gives.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../kernels.h"

namespace tokencarve {
namespace {

// A token and its sort key, sorted together: no indirection through an index array in the comparisons.
struct Keyed {
  double key;
  int64_t token;
};

// (key descending, token ascending): a total order, so std::sort (not stable) gives the stable answer.
inline bool comes_first(const Keyed& a, const Keyed& b) {
  return a.key > b.key || (a.key == b.key && a.token < b.token);
}

// ranks[i] = position of token i in the descending order of score; non-finite scores rank last.
void descending_ranks(const double* score, int64_t n, std::vector<Keyed>& keyed, std::vector<int64_t>& ranks) {
  for (int64_t i = 0; i < n; ++i)
    keyed[i] = {std::isfinite(score[i]) ? score[i] : -std::numeric_limits<double>::infinity(), i};
  std::sort(keyed.begin(), keyed.end(), comes_first);
  for (int64_t p = 0; p < n; ++p) ranks[keyed[p].token] = p;
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
    std::vector<Keyed> keyed(num_visual);
    std::vector<int64_t> r_a(num_visual), r_c(num_visual);
    for (int64_t b = begin; b < end; ++b) {
      descending_ranks(a_ptr + b * num_visual, num_visual, keyed, r_a);
      descending_ranks(c_ptr + b * num_visual, num_visual, keyed, r_c);
      // Two products and one sum, as python_ref.fuse_ranks (built with -ffp-contract=off: no FMA).
      for (int64_t i = 0; i < num_visual; ++i) {
        const double from_attn = lam * (nv - static_cast<double>(r_a[i]));
        const double from_info = (1.0 - lam) * (nv - static_cast<double>(r_c[i]));
        keyed[i] = {from_attn + from_info, i};
      }
      std::partial_sort(keyed.begin(), keyed.begin() + k1, keyed.end(), comes_first);
      for (int64_t p = 0; p < k1; ++p) out[b * k1 + p] = keyed[p].token;
    }
  });
  return order;
}

}  // namespace tokencarve
