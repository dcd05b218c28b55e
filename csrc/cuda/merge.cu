// merge on CUDA: stage II of SPEC.md and the compaction (python_ref.merge; csrc/cpu/merge.cpp). Five launches
// per call, each over every image of the batch:
//   1. unit_norms      float64 L2 norm of each of the K1 survivors (8 threads per row), and whether it is finite.
//   2. cosine          float64 dot products of the normalised rows, S[b, a] for b in B (sources), a in A
//                      (destinations); a 16 x 16 tile of S per block, the feature axis split over blocks into
//                      float64 partial sums.
//   3. best_match      one warp per source: the partial sums added in split order, rounded to float32, then
//                      m_b = max_a S[b, a] and t_b = its lowest A position.
//   4. plan            one block per image: which r sources merge (largest m_b, ties earlier in B), each
//                      destination's merged sources in B order (a CSR list), and the kept tokens in ascending
//                      original order (keep_idx).
//   5. write_rows      one block per output row: a destination's float64 weighted sum of itself and its sources
//                      in B order, divided as in the reference; a kept source copied.
//
// Exactness. The issue asked for fp32 accumulation of the similarities; float64 is used instead, as in the
// reference and the CPU kernel, because it agrees with them strictly better: the sums differ from theirs only
// in the order and the rounding of float64 operations (another summation order, fused multiply-adds), far
// below float32 resolution, so after rounding to float32 every comparison (argmax, merge order) agrees with
// theirs (unless a similarity lies within about 1e-16 of a float32 rounding boundary), and exact ties
// (duplicated tokens) stay exact ties, because tied entries are computed by the same sequence of operations.
// float64 costs little at these sizes (96 x 96 x 4096 per LLaVA image). Steps 4 and 5 repeat the CPU kernel's operations in its order (fp64 mul and add rounded one
// by one, never fused), so with the same merge decisions the carved rows and sizes equal the CPU's bit for
// bit. No float atomics anywhere (only integer counts, whose sum does not depend on order): the output is the
// same on every run.
//
// Values of `order` are the caller's promise (select returns valid ones): a token outside [0, Nv) or a
// repeated token stops the kernel with a device-side assertion instead of reading out of bounds.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <climits>
#include <cmath>

#include "../checks.h"
#include "../kernels.h"
#include "common.cuh"

namespace tokencarve {
namespace {

using cuda::comes_first;
using cuda::kWarp;

constexpr unsigned int kFullMask = 0xffffffffu;

// ---- 1. norms ----

constexpr int kNormLanes = 8;                          // threads per row
constexpr int kNormThreads = 256;                      // 32 rows per block
constexpr int kNormRows = kNormThreads / kNormLanes;

template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads)
    unit_norms_kernel(const scalar_t* __restrict__ hidden, const int64_t* __restrict__ order, int64_t rows,
                      int num_visual, int k1, int64_t dim, double* __restrict__ norm, bool* __restrict__ finite) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kNormRows + threadIdx.x / kNormLanes;  // row of [B, K1]
  const int lane = threadIdx.x % kNormLanes;
  double sum_sq = 0.0;
  bool ok = true;
  if (r < rows) {
    const int64_t image = r / k1;
    const int64_t token = order[r];
    CUDA_KERNEL_ASSERT_MSG(token >= 0 && token < num_visual, "tokencarve::merge: order holds a token outside [0, Nv)");
    const scalar_t* x = hidden + (image * num_visual + token) * dim;
    for (int64_t d = lane; d < dim; d += kNormLanes) {
      const double v = static_cast<double>(x[d]);
      ok = ok && isfinite(v);
      sum_sq = fma(v, v, sum_sq);
    }
  }
  // The 8 lanes of a row are 8 consecutive lanes of one warp: add their sums in lane order (a fixed order).
  const int warp_lane = threadIdx.x % kWarp;
  const int first = warp_lane - lane;
  double total = 0.0;
  for (int l = 0; l < kNormLanes; ++l) total += __shfl_sync(kFullMask, sum_sq, first + l);
  const unsigned int bad = __ballot_sync(kFullMask, !ok);
  if (r < rows && lane == 0) {
    // The reference normalises by max(norm, 1e-30): a zero row stays zero (similarity 0 with everything).
    norm[r] = fmax(sqrt(total), 1e-30);
    finite[r] = ((bad >> first) & 0xffu) == 0;
  }
}

// ---- 2. cosine partial sums ----

constexpr int kTile = 16;          // 16 x 16 similarities per block, one per thread
constexpr int kChunk = 32;         // features per shared-memory tile
constexpr int kTargetBlocks = 264; // about two blocks per SM of an H100 for one image

struct CosineSplit {
  int splits;         // blocks along the feature axis
  int64_t per_split;  // features per block, a multiple of kChunk
};

// The split depends on (nA, nB, D) only, never on the batch size: an image's similarities (and hence its
// selection) do not depend on the other images of the batch.
CosineSplit cosine_split(int64_t n_a, int64_t n_b, int64_t dim) {
  const int64_t tiles = cuda::ceil_div(n_a, kTile) * cuda::ceil_div(n_b, kTile);
  const int64_t max_splits = std::max<int64_t>(1, dim / (8 * kChunk));  // at least 256 features per block
  const int64_t splits = std::clamp<int64_t>(cuda::ceil_div(kTargetBlocks, tiles), 1, max_splits);
  // At least one chunk per split, so D = 0 gets one split (and similarities 0, as on the CPU).
  const int64_t per_split = std::max<int64_t>(1, cuda::ceil_div(cuda::ceil_div(dim, splits), kChunk)) * kChunk;
  return {static_cast<int>(std::max<int64_t>(1, cuda::ceil_div(dim, per_split))), per_split};
}

// Row `slot` of one image's K1 survivors, normalised, features [d0, d0 + kChunk) into rows[i][*] (zero past
// the end of the row, past the last survivor, and for a non-finite row, as the reference zeroes those).
template <typename scalar_t>
__device__ __forceinline__ void load_unit_chunk(const scalar_t* image_rows, const int64_t* order, const double* norm,
                                                const bool* finite, int first_slot, int count, int64_t d0,
                                                int64_t d_end, int64_t dim, double (*rows)[kChunk + 1]) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kTile * kTile) {
    const int i = e / kChunk, c = e % kChunk;
    const int64_t d = d0 + c;
    double v = 0.0;
    if (i < count && d < d_end) {
      const int slot = first_slot + i;
      if (finite[slot]) v = static_cast<double>(image_rows[order[slot] * dim + d]) / norm[slot];
    }
    rows[i][c] = v;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kTile)
    cosine_kernel(const scalar_t* __restrict__ hidden, const int64_t* __restrict__ order,
                  const double* __restrict__ norm, const bool* __restrict__ finite, int num_visual, int k1, int n_a,
                  int64_t dim, int tiles_b, int tiles_a, int splits, int64_t per_split,
                  double* __restrict__ partial) {
  // Padded rows: the 16 threads of a half-warp read 16 different rows at one column, conflict-free.
  __shared__ double src_rows[kTile][kChunk + 1];
  __shared__ double dst_rows[kTile][kChunk + 1];
  const int n_b = k1 - n_a;
  int64_t block = blockIdx.x;
  const int tile_a = static_cast<int>(block % tiles_a);
  block /= tiles_a;
  const int tile_b = static_cast<int>(block % tiles_b);
  block /= tiles_b;
  const int split = static_cast<int>(block % splits);
  const int64_t image = block / splits;

  const scalar_t* image_rows = hidden + image * num_visual * dim;
  const int64_t* image_order = order + image * k1;
  const double* image_norm = norm + image * k1;
  const bool* image_finite = finite + image * k1;
  const int b0 = tile_b * kTile, a0 = tile_a * kTile;
  const int count_b = min(kTile, n_b - b0), count_a = min(kTile, n_a - a0);
  const int64_t d_begin = split * per_split;
  const int64_t d_end = min(dim, d_begin + per_split);
  const int ty = threadIdx.x / kTile, tx = threadIdx.x % kTile;

  double acc = 0.0;
  for (int64_t d0 = d_begin; d0 < d_end; d0 += kChunk) {
    load_unit_chunk(image_rows, image_order, image_norm, image_finite, n_a + b0, count_b, d0, d_end, dim, src_rows);
    load_unit_chunk(image_rows, image_order, image_norm, image_finite, a0, count_a, d0, d_end, dim, dst_rows);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kChunk; ++c) acc = fma(src_rows[ty][c], dst_rows[tx][c], acc);
    __syncthreads();  // the tiles are reloaded next iteration
  }
  if (ty < count_b && tx < count_a)
    partial[((image * splits + split) * n_b + b0 + ty) * static_cast<int64_t>(n_a) + a0 + tx] = acc;
}

// ---- 3. best match of each source ----

constexpr int kMatchThreads = 256;  // one warp per source
constexpr int kMatchWarps = kMatchThreads / kWarp;

__global__ void __launch_bounds__(kMatchThreads)
    best_match_kernel(const double* __restrict__ partial, const bool* __restrict__ finite, int64_t batch, int k1,
                      int n_a, int splits, float* __restrict__ best, int* __restrict__ target) {
  const int n_b = k1 - n_a;
  const int64_t source = static_cast<int64_t>(blockIdx.x) * kMatchWarps + threadIdx.x / kWarp;  // of [B, nB]
  if (source >= batch * n_b) return;  // whole warps leave together: the shuffles below see full warps
  const int lane = threadIdx.x % kWarp;
  const int64_t image = source / n_b;
  const int b = static_cast<int>(source - image * n_b);
  const bool src_finite = finite[image * k1 + n_a + b];
  const int64_t split_stride = static_cast<int64_t>(n_b) * n_a;
  const double* row = partial + (image * splits * n_b + b) * static_cast<int64_t>(n_a);

  float m = -INFINITY;
  int t = INT_MAX;  // lanes that see no destination lose every tie
  for (int a = lane; a < n_a; a += kWarp) {
    double sum = 0.0;
    for (int s = 0; s < splits; ++s) sum += row[s * split_stride + a];
    // A row with a non-finite entry has similarity -inf with everything (python_ref.cosine_similarity).
    const float sim = src_finite && finite[image * k1 + a] ? static_cast<float>(sum) : -INFINITY;
    if (sim > m || t == INT_MAX) {  // ascending a: a strict > keeps the lowest position among equals
      m = sim;
      t = a;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float m_other = __shfl_down_sync(kFullMask, m, offset);
    const int t_other = __shfl_down_sync(kFullMask, t, offset);
    if (comes_first(m_other, t_other, m, t)) {
      m = m_other;
      t = t_other;
    }
  }
  if (lane == 0) {
    best[source] = m;
    target[source] = t;
  }
}

// ---- 4. plan ----

constexpr int kPlanThreads = 512;

// offsets: n + 1 ints, offsets[0] = 0 and offsets[a + 1] = the count of a; on return offsets[a] = the sum of
// the counts before a: CSR offsets. Chunked block scan with a running carry; all threads of the block must call it.
template <typename Scan>
__device__ void counts_to_offsets(int* offsets, int n, typename Scan::TempStorage& storage) {
  int carry = 0;
  for (int base = 0; base < n; base += kPlanThreads) {
    const int a = base + threadIdx.x;
    const int count = a < n ? offsets[a + 1] : 0;
    int inclusive, total;
    Scan(storage).InclusiveSum(count, inclusive, total);
    if (a < n) offsets[a + 1] = carry + inclusive;
    carry += total;
    __syncthreads();  // storage is reused by the next chunk (and the offsets are read after the call)
  }
}

// The plan's scratch, [B, ...] int32 tensors sliced by image (the *_all arguments):
//   merge_into [nB]      destination position a of a merged source, -1 for a kept one
//   offsets    [nA + 1]  destination a's merged sources are sources[offsets[a] .. offsets[a + 1])
//   cursor     [nA]      next free place in a's list while it is filled
//   sources    [r]       source positions (in B), grouped by destination, in B order inside a group
//   candidate  [Nv]      survivor slot (0..K1) of each kept token, -1 otherwise
//   slot       [T]       survivor slot of output row p

__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(const int64_t* __restrict__ order, const float* __restrict__ best, const int* __restrict__ target,
                int num_visual, int k1, int n_a, int r, int t_out, int scratch_stride_src, int scratch_stride_dst,
                int* __restrict__ merge_into_all, int* __restrict__ offsets_all, int* __restrict__ cursor_all,
                int* __restrict__ sources_all, int* __restrict__ candidate_all, int* __restrict__ slot_all,
                int64_t* __restrict__ keep_idx) {
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t image = blockIdx.x;
  const int n_b = k1 - n_a;
  const int64_t* image_order = order + image * k1;
  int* merge_into = merge_into_all + image * scratch_stride_src;
  int* offsets = offsets_all + image * (scratch_stride_dst + 1);
  int* cursor = cursor_all + image * scratch_stride_dst;
  int* sources = sources_all + image * max(r, 1);
  int* candidate = candidate_all + image * num_visual;
  int* slot = slot_all + image * t_out;

  // Which sources merge: the r with the largest m_b, ties earlier in B (rank counting, a total order).
  for (int b = threadIdx.x; b < n_b; b += kPlanThreads) {
    int into = -1;
    if (r > 0) {
      const float m = best[image * n_b + b];
      int rank = 0;
      for (int other = 0; other < n_b; ++other) rank += comes_first(best[image * n_b + other], other, m, b);
      if (rank < r) into = target[image * n_b + b];
    }
    merge_into[b] = into;
  }
  for (int a = threadIdx.x; a <= n_a; a += kPlanThreads) offsets[a] = 0;
  for (int t = threadIdx.x; t < num_visual; t += kPlanThreads) candidate[t] = -1;
  __syncthreads();

  // CSR of merged sources per destination: integer counts, offsets by a block scan, then one warp places
  // the sources chunk by chunk in B order (peers with the same destination found with __match_any_sync).
  for (int b = threadIdx.x; b < n_b; b += kPlanThreads)
    if (merge_into[b] >= 0) atomicAdd(offsets + merge_into[b] + 1, 1);
  __syncthreads();
  counts_to_offsets<Scan>(offsets, n_a, scan_storage);
  for (int a = threadIdx.x; a < n_a; a += kPlanThreads) cursor[a] = offsets[a];
  __syncthreads();
  if (threadIdx.x < kWarp) {
    const int lane = threadIdx.x;
    for (int base = 0; base < n_b; base += kWarp) {
      const int b = base + lane;
      const int into = b < n_b ? merge_into[b] : -1;
      const unsigned int peers = __match_any_sync(kFullMask, into >= 0 ? into : -1 - lane);  // idle lanes: alone
      const int before = __popc(peers & ((1u << lane) - 1u));
      const int place = into >= 0 ? cursor[into] + before : 0;
      __syncwarp();  // every peer has read cursor[into] before its first peer advances it
      if (into >= 0) {
        sources[place] = b;
        if (before == 0) cursor[into] += __popc(peers);
      }
      __syncwarp();
    }
  }

  // Compaction: mark the kept tokens (every destination, the unmerged sources), then a scan over token
  // indices puts them in ascending original order.
  for (int c = threadIdx.x; c < k1; c += kPlanThreads) {
    if (c < n_a || merge_into[c - n_a] < 0) {
      const int64_t token = image_order[c];
      CUDA_KERNEL_ASSERT_MSG(token >= 0 && token < num_visual, "tokencarve::merge: order holds a token outside [0, Nv)");
      candidate[token] = c;
    }
  }
  __syncthreads();
  int carry = 0;
  for (int base = 0; base < num_visual; base += kPlanThreads) {
    const int token = base + threadIdx.x;
    const int c = token < num_visual ? candidate[token] : -1;
    int position, total;
    Scan(scan_storage).ExclusiveSum(c >= 0 ? 1 : 0, position, total);
    if (c >= 0 && carry + position < t_out) {
      keep_idx[image * t_out + carry + position] = token;
      slot[carry + position] = c;
    }
    carry += total;
    __syncthreads();  // scan_storage is reused by the next chunk
  }
  // Fewer kept tokens than T means two survivors were the same token: the rows past them would be garbage.
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT_MSG(carry == t_out, "tokencarve::merge: order holds a token twice");
  }
}

// ---- 5. output rows ----

constexpr int kRowThreads = 256;

// The weight of a source in the weighted mean; mirrors merge_image in csrc/cpu/merge.cpp.
__device__ __forceinline__ double source_weight(MergeMode mode, float best, double size) {
  if (mode == MergeMode::kSimilarity) {
    const double m = static_cast<double>(best);
    return m < 0.0 ? 0.0 : m;  // std::max(m, 0.0) of the CPU kernel, -0.0 included
  }
  return mode == MergeMode::kSize ? size : 1.0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    write_rows_kernel(const scalar_t* __restrict__ hidden, const int64_t* __restrict__ order,
                      const float* __restrict__ sizes, const float* __restrict__ best,
                      const int* __restrict__ offsets_all, const int* __restrict__ sources_all,
                      const int* __restrict__ slot_all, const int64_t* __restrict__ keep_idx, int num_visual, int k1,
                      int n_a, int r, int t_out, int offsets_stride, int64_t dim, MergeMode mode,
                      scalar_t* __restrict__ carved, float* __restrict__ carved_sizes) {
  const int64_t out_row = blockIdx.x;  // of [B, T]
  const int64_t image = out_row / t_out;
  const int n_b = k1 - n_a;
  const int c = slot_all[out_row];
  const int64_t token = keep_idx[out_row];
  const scalar_t* image_rows = hidden + image * num_visual * dim;
  const float* image_sizes = sizes ? sizes + image * num_visual : nullptr;
  scalar_t* out = carved + out_row * dim;
  auto size_of = [&](int64_t t) { return image_sizes ? static_cast<double>(image_sizes[t]) : 1.0; };

  if (c >= n_a) {  // a kept source: its row unchanged
    for (int64_t d = threadIdx.x; d < dim; d += kRowThreads) out[d] = image_rows[token * dim + d];
    if (threadIdx.x == 0) carved_sizes[out_row] = static_cast<float>(size_of(token));
    return;
  }
  // A destination: (w_a h_a + sum_b w_b h_b) / (w_a + sum_b w_b), every product and sum rounded on its own
  // in the CPU kernel's order (the destination, then its sources in B order), so the bits equal the CPU's.
  const int* offsets = offsets_all + image * offsets_stride;
  const int* sources = sources_all + image * max(r, 1);
  const int64_t* image_order = order + image * k1;
  const float* image_best = best + image * n_b;
  const int begin = offsets[c], end = offsets[c + 1];
  const double w_dst = mode == MergeMode::kSize ? size_of(token) : 1.0;
  double weight = w_dst, new_size = size_of(token);
  for (int k = begin; k < end; ++k) {
    const int b = sources[k];
    const double s = size_of(image_order[n_a + b]);
    weight = __dadd_rn(weight, source_weight(mode, image_best[b], s));
    new_size = __dadd_rn(new_size, s);
  }
  for (int64_t d = threadIdx.x; d < dim; d += kRowThreads) {
    double acc = __dmul_rn(static_cast<double>(image_rows[token * dim + d]), w_dst);
    for (int k = begin; k < end; ++k) {
      const int b = sources[k];
      const int64_t src = image_order[n_a + b];
      const double w = source_weight(mode, image_best[b], size_of(src));
      acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(image_rows[src * dim + d]), w));
    }
    out[d] = static_cast<scalar_t>(acc / weight);  // double -> scalar_t as the CPU kernel casts
  }
  if (threadIdx.x == 0) carved_sizes[out_row] = static_cast<float>(new_size);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cuda(const at::Tensor& hidden, const at::Tensor& order,
                                                          int64_t budget, c10::string_view mode_name,
                                                          const std::optional<at::Tensor>& sizes) {
  const MergeMode mode = check_merge(hidden, order, budget, mode_name, sizes);
  const int64_t batch = hidden.size(0), num_visual = hidden.size(1), dim = hidden.size(2);
  cuda::check_int32_sizes(num_visual, kMerge);
  const BudgetSplit split = budget_split(num_visual, budget);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor carved = at::empty({batch, split.t_out, dim}, hidden.options());
  at::Tensor keep_idx = at::empty({batch, split.t_out}, order.options());
  at::Tensor carved_sizes = at::empty({batch, split.t_out}, hidden.options().dtype(at::kFloat));
  if (batch == 0 || split.t_out == 0) return {carved, keep_idx, carved_sizes};  // nothing to launch

  const at::Tensor h = hidden.contiguous();
  const at::Tensor o = order.contiguous();
  const at::Tensor s = sizes.has_value() ? sizes->to(at::kFloat).contiguous() : at::Tensor();
  const int nv = static_cast<int>(num_visual), k1 = static_cast<int>(split.k1), n_a = static_cast<int>(split.n_a);
  const int n_b = k1 - n_a, r = static_cast<int>(split.r), t_out = static_cast<int>(split.t_out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat), i32 = hidden.options().dtype(at::kInt);

  // best / target are read by plan and write_rows only for merged sources, which exist only when r > 0.
  const at::Tensor best = at::empty({batch, std::max(n_b, 1)}, f32);
  const at::Tensor target = at::empty({batch, std::max(n_b, 1)}, i32);
  const int64_t* order_ptr = o.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "tokencarve_merge_cuda", [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    if (r > 0) {  // r > 0 implies nA >= 1 and nB >= 1
      const at::Tensor norm = at::empty({batch, k1}, hidden.options().dtype(at::kDouble));
      const at::Tensor finite = at::empty({batch, k1}, hidden.options().dtype(at::kBool));
      const int64_t rows = batch * k1;
      unit_norms_kernel<scalar_t><<<cuda::grid_size(cuda::ceil_div(rows, kNormRows), kMerge), kNormThreads, 0,
                                    stream>>>(h_ptr, order_ptr, rows, nv, k1, dim, norm.data_ptr<double>(),
                                              finite.data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      const CosineSplit cs = cosine_split(n_a, n_b, dim);
      const int tiles_b = static_cast<int>(cuda::ceil_div(n_b, kTile)), tiles_a = static_cast<int>(cuda::ceil_div(n_a, kTile));
      const at::Tensor partial = at::empty({batch, cs.splits, n_b, n_a}, hidden.options().dtype(at::kDouble));
      cosine_kernel<scalar_t><<<cuda::grid_size(batch * cs.splits * tiles_b * tiles_a, kMerge), kTile * kTile, 0,
                                stream>>>(h_ptr, order_ptr, norm.data_ptr<double>(), finite.data_ptr<bool>(), nv, k1,
                                          n_a, dim, tiles_b, tiles_a, cs.splits, cs.per_split,
                                          partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      best_match_kernel<<<cuda::grid_size(cuda::ceil_div(batch * n_b, kMatchWarps), kMerge), kMatchThreads, 0,
                          stream>>>(partial.data_ptr<double>(), finite.data_ptr<bool>(), batch, k1, n_a, cs.splits,
                                    best.data_ptr<float>(), target.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  const int src_stride = std::max(n_b, 1), dst_stride = std::max(n_a, 1);
  const at::Tensor merge_into = at::empty({batch, src_stride}, i32);
  const at::Tensor offsets = at::empty({batch, dst_stride + 1}, i32);
  const at::Tensor cursor = at::empty({batch, dst_stride}, i32);
  const at::Tensor sources = at::empty({batch, std::max(r, 1)}, i32);
  const at::Tensor candidate = at::empty({batch, nv}, i32);
  const at::Tensor slot = at::empty({batch, t_out}, i32);
  plan_kernel<<<cuda::grid_size(batch, kMerge), kPlanThreads, 0, stream>>>(
      order_ptr, best.data_ptr<float>(), target.data_ptr<int>(), nv, k1, n_a, r, t_out, src_stride, dst_stride,
      merge_into.data_ptr<int>(), offsets.data_ptr<int>(), cursor.data_ptr<int>(), sources.data_ptr<int>(),
      candidate.data_ptr<int>(), slot.data_ptr<int>(), keep_idx.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "tokencarve_merge_cuda_rows", [&] {
    write_rows_kernel<scalar_t><<<cuda::grid_size(batch * t_out, kMerge), kRowThreads, 0, stream>>>(
        h.data_ptr<scalar_t>(), order_ptr, s.defined() ? s.data_ptr<float>() : nullptr, best.data_ptr<float>(),
        offsets.data_ptr<int>(), sources.data_ptr<int>(), slot.data_ptr<int>(), keep_idx.data_ptr<int64_t>(), nv, k1,
        n_a, r, t_out, dst_stride + 1, dim, mode, carved.data_ptr<scalar_t>(),
        carved_sizes.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {carved, keep_idx, carved_sizes};
}

}  // namespace tokencarve
