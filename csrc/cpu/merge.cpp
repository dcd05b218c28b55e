// merge on the CPU: stage II of SPEC.md and the compaction, one image per task.
//
// Cosine similarities are float64 dot products of float64-normalised rows, summed in a fixed order
// (8 lanes, then the lanes left to right), then rounded to float32 as in python_ref: the result does not
// depend on the thread count or the instruction set, and agrees with the reference's argmax and merge
// order. Merged states accumulate in float64 in source order: no atomics, identical run to run.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "../kernels.h"

namespace tokencarve {
namespace {

// Every dot product here sums in one canonical order: lane l (0..7) accumulates the elements i with
// i % 8 == l in increasing i, then the lanes are added left to right. The vector code below (cloned for
// AVX-512, AVX2 and baseline x86-64 at load time) and the scalar tail keep that order exactly, and
// -ffp-contract=off forbids fused multiply-adds, so every clone returns the same bits.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef double v8d __attribute__((vector_size(64)));
constexpr int kLanes = 8;

__attribute__((always_inline)) inline v8d load8(const double* p) {
  v8d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline double finish(v8d acc, const double* x, const double* y, int64_t i, int64_t n) {
  double lane[kLanes];
  std::memcpy(lane, &acc, sizeof(lane));
  for (int l = 0; i < n; ++i, ++l) lane[l] += x[i] * y[i];
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
double dot(const double* x, const double* y, int64_t n) {
  v8d acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load8(x + i) * load8(y + i);
  return finish(acc, x, y, i, n);
}

// out[a * ld_out + b] = dot(x + a * n, y + b * n, n) for a 4 x 4 tile of rows: each y row is loaded once
// for four x rows (about 4x faster than separate dots at D = 4096), same bits as `dot`.
__attribute__((target_clones("avx512f", "avx2", "default")))
void dot_tile4x4(const double* x, const double* y, int64_t n, double* out, int64_t ld_out) {
  v8d acc[4][4] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    v8d yv[4];
    for (int b = 0; b < 4; ++b) yv[b] = load8(y + b * n + i);
    for (int a = 0; a < 4; ++a) {
      const v8d xv = load8(x + a * n + i);
      for (int b = 0; b < 4; ++b) acc[a][b] += xv * yv[b];
    }
  }
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) out[a * ld_out + b] = finish(acc[a][b], x + a * n, y + b * n, i, n);
}
#pragma GCC diagnostic pop

// sim[i * cols + j] = dot(x_i, y_j) for x [rows, n], y [cols, n].
void dot_matrix(const double* x, int64_t rows, const double* y, int64_t cols, int64_t n, double* sim) {
  const int64_t rows4 = rows / 4 * 4, cols4 = cols / 4 * 4;
  for (int64_t i = 0; i < rows4; i += 4)
    for (int64_t j = 0; j < cols4; j += 4) dot_tile4x4(x + i * n, y + j * n, n, sim + i * cols + j, cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = (i < rows4 ? cols4 : 0); j < cols; ++j) sim[i * cols + j] = dot(x + i * n, y + j * n, n);
}

// Rows `idx` of one image as float64, normalised (zero rows stay zero); finite[i] = row i is finite.
template <typename scalar_t>
void gather_unit_rows(const scalar_t* image, const int64_t* idx, int64_t count, int64_t dim, std::vector<double>& rows,
                      std::vector<char>& finite) {
  rows.resize(count * dim);
  finite.resize(count);
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* src = image + idx[i] * dim;
    double* dst = rows.data() + i * dim;
    bool ok = true;
    for (int64_t j = 0; j < dim; ++j) {
      dst[j] = static_cast<double>(src[j]);
      ok = ok && std::isfinite(dst[j]);
    }
    finite[i] = ok;
    if (!ok) std::fill(dst, dst + dim, 0.0);
    const double norm = std::max(std::sqrt(dot(dst, dst, dim)), 1e-30);
    for (int64_t j = 0; j < dim; ++j) dst[j] /= norm;
  }
}

// order must hold K1 distinct token indices in [0, Nv): anything else would read out of bounds.
void check_order_values(const int64_t* order, int64_t k1, int64_t num_visual) {
  std::vector<char> seen(num_visual, 0);
  for (int64_t p = 0; p < k1; ++p) {
    const int64_t token = order[p];
    TORCH_CHECK_VALUE(token >= 0 && token < num_visual, kMerge, ": order holds token index ", token,
                      ", outside [0, Nv = ", num_visual, ")");
    TORCH_CHECK_VALUE(!seen[token], kMerge, ": order holds token index ", token, " twice");
    seen[token] = 1;
  }
}

template <typename scalar_t>
void merge_image(const scalar_t* image, const int64_t* order, const float* sizes, int64_t num_visual, int64_t dim,
                 const BudgetSplit& split, MergeMode mode, scalar_t* carved, int64_t* keep_idx, float* carved_sizes) {
  check_order_values(order, split.k1, num_visual);
  const int64_t n_a = split.n_a, n_b = split.k1 - split.n_a;
  const int64_t* dst = order;
  const int64_t* src = order + n_a;

  // Stage II bookkeeping: best match m_b, target t_b (lowest A position on ties), merged flag.
  std::vector<float> best(n_b, 0.0f);
  std::vector<int64_t> target(n_b, 0);
  std::vector<char> merged(n_b, 0);
  if (split.r > 0) {
    std::vector<double> unit_a, unit_b;
    std::vector<char> finite_a, finite_b;
    gather_unit_rows(image, dst, n_a, dim, unit_a, finite_a);
    gather_unit_rows(image, src, n_b, dim, unit_b, finite_b);
    std::vector<double> sim(n_b * n_a);  // cos(source i, destination j) at [i * n_a + j]
    dot_matrix(unit_b.data(), n_b, unit_a.data(), n_a, dim, sim.data());
    for (int64_t b = 0; b < n_b; ++b) {
      float m = -std::numeric_limits<float>::infinity();
      int64_t t = 0;
      for (int64_t j = 0; j < n_a; ++j) {
        const float s = finite_b[b] && finite_a[j] ? static_cast<float>(sim[b * n_a + j])
                                                   : -std::numeric_limits<float>::infinity();
        if (s > m) {
          m = s;
          t = j;
        }
      }
      best[b] = m;
      target[b] = t;
    }
    std::vector<int64_t> by_best(n_b);
    std::iota(by_best.begin(), by_best.end(), int64_t{0});
    std::partial_sort(by_best.begin(), by_best.begin() + split.r, by_best.end(), [&](int64_t x, int64_t y) {
      return best[x] > best[y] || (best[x] == best[y] && x < y);
    });
    for (int64_t p = 0; p < split.r; ++p) merged[by_best[p]] = 1;
  }

  // Weighted sums per destination, in float64, sources in B order.
  auto size_of = [&](int64_t token) { return sizes ? static_cast<double>(sizes[token]) : 1.0; };
  std::vector<double> acc(n_a * dim), weight(n_a), new_size(n_a);
  for (int64_t j = 0; j < n_a; ++j) {
    const double w = mode == MergeMode::kSize ? size_of(dst[j]) : 1.0;
    const scalar_t* row = image + dst[j] * dim;
    for (int64_t d = 0; d < dim; ++d) acc[j * dim + d] = static_cast<double>(row[d]) * w;
    weight[j] = w;
    new_size[j] = size_of(dst[j]);
  }
  for (int64_t i = 0; i < n_b; ++i) {
    if (!merged[i]) continue;
    double w = 1.0;
    if (mode == MergeMode::kSimilarity) w = std::max(static_cast<double>(best[i]), 0.0);
    if (mode == MergeMode::kSize) w = size_of(src[i]);
    const scalar_t* row = image + src[i] * dim;
    double* out = acc.data() + target[i] * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] += static_cast<double>(row[d]) * w;
    weight[target[i]] += w;
    new_size[target[i]] += size_of(src[i]);
  }

  // Compaction: destinations and unmerged sources, ascending original index.
  std::vector<std::pair<int64_t, int64_t>> kept;  // (token, slot): slot < n_a is a destination
  kept.reserve(split.t_out);
  for (int64_t j = 0; j < n_a; ++j) kept.emplace_back(dst[j], j);
  for (int64_t i = 0; i < n_b; ++i)
    if (!merged[i]) kept.emplace_back(src[i], n_a + i);
  std::sort(kept.begin(), kept.end());
  for (int64_t p = 0; p < split.t_out; ++p) {
    const auto [token, slot] = kept[p];
    keep_idx[p] = token;
    scalar_t* out = carved + p * dim;
    if (slot < n_a) {
      const double* sum = acc.data() + slot * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(sum[d] / weight[slot]);
      carved_sizes[p] = static_cast<float>(new_size[slot]);
    } else {
      std::copy(image + token * dim, image + (token + 1) * dim, out);
      carved_sizes[p] = static_cast<float>(size_of(token));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cpu(const at::Tensor& hidden, const at::Tensor& order,
                                                         int64_t budget, c10::string_view mode_name,
                                                         const std::optional<at::Tensor>& sizes) {
  const MergeMode mode = check_merge(hidden, order, budget, mode_name, sizes);
  const int64_t batch = hidden.size(0), num_visual = hidden.size(1), dim = hidden.size(2);
  const BudgetSplit split = budget_split(num_visual, budget);
  at::Tensor carved = at::empty({batch, split.t_out, dim}, hidden.options());
  at::Tensor keep_idx = at::empty({batch, split.t_out}, order.options());
  at::Tensor carved_sizes = at::empty({batch, split.t_out}, hidden.options().dtype(at::kFloat));
  if (batch == 0 || split.t_out == 0) return {carved, keep_idx, carved_sizes};
  const at::Tensor h = hidden.contiguous();
  const at::Tensor o = order.contiguous();
  const at::Tensor s = sizes.has_value() ? sizes->to(at::kFloat).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "tokencarve_merge_cpu", [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const int64_t* o_ptr = o.data_ptr<int64_t>();
    const float* s_ptr = s.defined() ? s.data_ptr<float>() : nullptr;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        merge_image(h_ptr + b * num_visual * dim, o_ptr + b * split.k1, s_ptr ? s_ptr + b * num_visual : nullptr,
                    num_visual, dim, split, mode, carved.data_ptr<scalar_t>() + b * split.t_out * dim,
                    keep_idx.data_ptr<int64_t>() + b * split.t_out, carved_sizes.data_ptr<float>() + b * split.t_out);
      }
    });
  });
  return {carved, keep_idx, carved_sizes};
}

}  // namespace tokencarve
