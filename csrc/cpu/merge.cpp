// merge on the CPU: stage II of SPEC.md and the compaction, one image per task.
//
// Cosine similarities are float64 dot products of float64-normalised rows, summed in a fixed order
// (8 lanes, then the lanes left to right), then rounded to float32 as in python_ref: the result does not
// depend on the thread count or the instruction set, and agrees with the reference's argmax and merge
// order. Merged states accumulate in float64 in source order: no atomics, identical run to run.
// Written for speed at LLaVA shapes (576 x 4096, 192 survivors): the dot products run in 4 x 4 tiles over
// feature blocks that stay in L2, and each output row is computed once, straight into the output.

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
#include "rows.h"

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

__attribute__((always_inline)) inline void store8(double* p, v8d v) { std::memcpy(p, &v, sizeof(v)); }

// The lane sum of acc plus the tail elements [i, n) of x . y, in the canonical order.
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

// acc[a * ld + b] (8 lanes each) += the products of features [begin, end) of x rows a = 0..3 and y rows
// b = 0..3 (rows of length n), lane by lane: each y vector is loaded once for four x rows.
__attribute__((target_clones("avx512f", "avx2", "default")))
void lanes_tile4x4(const double* x, const double* y, int64_t n, int64_t begin, int64_t end, double* acc, int64_t ld) {
  v8d a[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) a[r][c] = load8(acc + (r * ld + c) * kLanes);
  for (int64_t i = begin; i < end; i += kLanes) {
    v8d yv[4];
    for (int c = 0; c < 4; ++c) yv[c] = load8(y + c * n + i);
    for (int r = 0; r < 4; ++r) {
      const v8d xv = load8(x + r * n + i);
      for (int c = 0; c < 4; ++c) a[r][c] += xv * yv[c];
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) store8(acc + (r * ld + c) * kLanes, a[r][c]);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void lanes_1x1(const double* x, const double* y, int64_t begin, int64_t end, double* acc) {
  v8d a = load8(acc);
  for (int64_t i = begin; i < end; i += kLanes) a += load8(x + i) * load8(y + i);
  store8(acc, a);
}
#pragma GCC diagnostic pop

// Features per pass of dot_matrix: the K1 rows' slices of one pass (192 x 4 KB at LLaVA shapes) stay in L2
// while every tile reads them, instead of streaming all rows from L3 once per row of tiles.
constexpr int64_t kFeatureBlock = 512;

// sim[i * cols + j] = dot(x_i, y_j) for x [rows, n], y [cols, n], the same bits as `dot`: each pair's 8 lane
// accumulators (lanes, [rows * cols * 8]) persist across feature blocks, so every lane still adds its
// elements in increasing order.
void dot_matrix(const double* x, int64_t rows, const double* y, int64_t cols, int64_t n, double* sim,
                std::vector<double>& lanes) {
  lanes.assign(rows * cols * kLanes, 0.0);
  const int64_t rows4 = rows / 4 * 4, cols4 = cols / 4 * 4, full = n / kLanes * kLanes;
  for (int64_t begin = 0; begin < full; begin += kFeatureBlock) {
    const int64_t end = std::min(full, begin + kFeatureBlock);
    for (int64_t i = 0; i < rows4; i += 4)
      for (int64_t j = 0; j < cols4; j += 4)
        lanes_tile4x4(x + i * n, y + j * n, n, begin, end, lanes.data() + (i * cols + j) * kLanes, cols);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = (i < rows4 ? cols4 : 0); j < cols; ++j)
        lanes_1x1(x + i * n, y + j * n, begin, end, lanes.data() + (i * cols + j) * kLanes);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      v8d acc;
      std::memcpy(&acc, lanes.data() + (i * cols + j) * kLanes, sizeof(acc));
      sim[i * cols + j] = finish(acc, x + i * n, y + j * n, full, n);
    }
}

// In place, each of `count` rows of length dim: zeroed if it holds a non-finite value (finite[i] = 0),
// then divided by max(its L2 norm, 1e-30), so a zero row stays zero. Cloned like `dot`: the division and
// the finite test vectorise (the results are the same bits in every clone).
__attribute__((target_clones("avx512f", "avx2", "default")))
void normalise_rows(double* rows, int64_t count, int64_t dim, char* finite) {
  for (int64_t i = 0; i < count; ++i) {
    double* row = rows + i * dim;
    finite[i] = zero_if_nonfinite(row, dim);
    const double norm = std::max(std::sqrt(dot(row, row, dim)), 1e-30);
    for (int64_t j = 0; j < dim; ++j) row[j] /= norm;
  }
}

// Rows `idx` of one image as float64, normalised (see normalise_rows).
template <typename scalar_t>
void gather_unit_rows(const scalar_t* image, const int64_t* idx, int64_t count, int64_t dim, std::vector<double>& rows,
                      std::vector<char>& finite) {
  rows.resize(count * dim);
  finite.resize(count);
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* src = image + idx[i] * dim;
    std::transform(src, src + dim, rows.data() + i * dim, [](scalar_t v) { return static_cast<double>(v); });
  }
  normalise_rows(rows.data(), count, dim, finite.data());
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

// Buffers of one thread, reused from image to image (about 6 MB at LLaVA shapes: allocating them per image
// costs page faults).
struct Workspace {
  std::vector<double> unit_a, unit_b, sim, lanes, row;
  std::vector<char> finite_a, finite_b;
};

template <typename scalar_t>
void merge_image(const scalar_t* image, const int64_t* order, const float* sizes, int64_t num_visual, int64_t dim,
                 const BudgetSplit& split, MergeMode mode, Workspace& ws, scalar_t* carved, int64_t* keep_idx,
                 float* carved_sizes) {
  check_order_values(order, split.k1, num_visual);
  const int64_t n_a = split.n_a, n_b = split.k1 - split.n_a;
  const int64_t* dst = order;
  const int64_t* src = order + n_a;

  // Stage II bookkeeping: best match m_b, target t_b (lowest A position on ties), merged flag.
  std::vector<float> best(n_b, 0.0f);
  std::vector<int64_t> target(n_b, 0);
  std::vector<char> merged(n_b, 0);
  if (split.r > 0) {
    gather_unit_rows(image, dst, n_a, dim, ws.unit_a, ws.finite_a);
    gather_unit_rows(image, src, n_b, dim, ws.unit_b, ws.finite_b);
    ws.sim.resize(n_b * n_a);  // cos(source i, destination j) at [i * n_a + j]
    dot_matrix(ws.unit_b.data(), n_b, ws.unit_a.data(), n_a, dim, ws.sim.data(), ws.lanes);
    for (int64_t b = 0; b < n_b; ++b) {
      float m = -std::numeric_limits<float>::infinity();
      int64_t t = 0;
      for (int64_t j = 0; j < n_a; ++j) {
        const float s = ws.finite_b[b] && ws.finite_a[j] ? static_cast<float>(ws.sim[b * n_a + j])
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

  // Each destination's merged sources, in B order: merged_src[first[j] .. first[j + 1]).
  std::vector<int64_t> first(n_a + 1, 0), merged_src(split.r);
  for (int64_t i = 0; i < n_b; ++i)
    if (merged[i]) ++first[target[i] + 1];
  std::partial_sum(first.begin(), first.end(), first.begin());
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < n_b; ++i)
    if (merged[i]) merged_src[fill[target[i]]++] = i;

  // Compaction: destinations and unmerged sources, ascending original index.
  std::vector<std::pair<int64_t, int64_t>> kept;  // (token, slot): slot < n_a is a destination
  kept.reserve(split.t_out);
  for (int64_t j = 0; j < n_a; ++j) kept.emplace_back(dst[j], j);
  for (int64_t i = 0; i < n_b; ++i)
    if (!merged[i]) kept.emplace_back(src[i], n_a + i);
  std::sort(kept.begin(), kept.end());

  auto size_of = [&](int64_t token) { return sizes ? static_cast<double>(sizes[token]) : 1.0; };
  auto source_weight = [&](int64_t i) {
    if (mode == MergeMode::kSimilarity) return std::max(static_cast<double>(best[i]), 0.0);
    return mode == MergeMode::kSize ? size_of(src[i]) : 1.0;
  };
  ws.row.resize(dim);
  double* acc = ws.row.data();
  for (int64_t p = 0; p < split.t_out; ++p) {
    const auto [token, slot] = kept[p];
    keep_idx[p] = token;
    scalar_t* out = carved + p * dim;
    const scalar_t* row = image + token * dim;
    if (slot >= n_a) {  // a kept source, unchanged
      std::copy(row, row + dim, out);
      carved_sizes[p] = static_cast<float>(size_of(token));
      continue;
    }
    // A destination: (w_a h_a + sum_b w_b h_b) / (w_a + sum_b w_b) in float64, its sources in B order
    // (csrc/cuda/merge.cu repeats these operations in this order).
    const double w_dst = mode == MergeMode::kSize ? size_of(token) : 1.0;
    double weight = w_dst, new_size = size_of(token);
    for (int64_t d = 0; d < dim; ++d) acc[d] = static_cast<double>(row[d]) * w_dst;
    for (int64_t k = first[slot]; k < first[slot + 1]; ++k) {
      const int64_t i = merged_src[k];
      const double w = source_weight(i);
      const scalar_t* src_row = image + src[i] * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<double>(src_row[d]) * w;
      weight += w;
      new_size += size_of(src[i]);
    }
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<scalar_t>(acc[d] / weight);
    carved_sizes[p] = static_cast<float>(new_size);
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
      Workspace ws;
      for (int64_t b = begin; b < end; ++b) {
        merge_image(h_ptr + b * num_visual * dim, o_ptr + b * split.k1, s_ptr ? s_ptr + b * num_visual : nullptr,
                    num_visual, dim, split, mode, ws, carved.data_ptr<scalar_t>() + b * split.t_out * dim,
                    keep_idx.data_ptr<int64_t>() + b * split.t_out, carved_sizes.data_ptr<float>() + b * split.t_out);
      }
    });
  });
  return {carved, keep_idx, carved_sizes};
}

}  // namespace tokencarve
