// select on CUDA: stable descending ranks of both scores, the fused IPGS score, and the K1 tokens with the
// largest fused score in descending order (SPEC.md stage 0.5 and stage I), the same indices as
// csrc/cpu/select.cpp and python_ref.select, bit for bit.
//
// Every ordering here is by (key descending, token index ascending), a total order (common.cuh,
// comes_first), so no step relies on a sort being stable: a bitonic network or a rank count gives the one
// answer a stable sort gives.
//   Nv <= 2048: one block per image sorts (key, index) pairs in shared memory with a bitonic network, three
//               times (attention, information, fused score): one launch for the whole op.
//   Nv  > 2048: (video, Nv = 16384) the rank of every token is counted, rank(i) = #{j : j comes before i},
//               by a grid of (image, token tile, key span) blocks that add their integer counts with
//               atomicAdd (integer sums do not depend on the order of the additions), then tokens are
//               scattered to their rank. O(Nv^2) comparisons, spread over the whole GPU, no scratch sort.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#include "../checks.h"
#include "../kernels.h"
#include "common.cuh"

namespace tokencarve {
namespace {

using cuda::comes_first;

// attn and info may have different dtypes; each is read through this tag (a uniform branch per load)
// instead of instantiating every kernel for 4 x 4 dtype pairs or converting the inputs first.
enum class ScoreDtype : int { kFloat, kHalf, kBFloat16, kDouble };

ScoreDtype score_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScoreDtype::kFloat;
    case at::kHalf: return ScoreDtype::kHalf;
    case at::kBFloat16: return ScoreDtype::kBFloat16;
    case at::kDouble: return ScoreDtype::kDouble;
    default: TORCH_CHECK_TYPE(false, kSelect, ": unsupported score dtype ", t.scalar_type());
  }
}

struct Score {
  const void* data;
  ScoreDtype dtype;

  // The rank key of element i: the score as float64 (exact for every input dtype), non-finite values as
  // -inf, which python_ref.descending_ranks ranks after every finite value, among themselves by index.
  // -0.0 == +0.0 under the comparison, as in the reference.
  __device__ __forceinline__ double key(int64_t i) const {
    double v;
    switch (dtype) {
      case ScoreDtype::kFloat: v = static_cast<const float*>(data)[i]; break;
      case ScoreDtype::kHalf: v = static_cast<float>(static_cast<const c10::Half*>(data)[i]); break;
      case ScoreDtype::kBFloat16: v = static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]); break;
      default: v = static_cast<const double*>(data)[i]; break;
    }
    return isfinite(v) ? v : -INFINITY;
  }
};

// s_i = lam * (Nv - r_a) + (1 - lam) * (Nv - r_c): two products, one sum, each rounded on its own
// (__dmul_rn / __dadd_rn are never contracted into a fused multiply-add, whatever the build flags), exactly
// as python_ref.fuse_ranks and the CPU kernel compute it, so the fused scores tie exactly where theirs do.
__device__ __forceinline__ double fused_score(double lam, double nv, int rank_attn, int rank_info) {
  const double from_attn = __dmul_rn(lam, nv - static_cast<double>(rank_attn));
  const double from_info = __dmul_rn(1.0 - lam, nv - static_cast<double>(rank_info));
  return __dadd_rn(from_attn, from_info);
}

// ---- Nv <= kBlockMaxNv: one block per image ----

constexpr int kBlockMaxNv = 2048;

// Sorts kPad (key, index) pairs in shared memory so that pair p comes before pair p + 1 (comes_first).
// One thread per compare-exchange pair: blockDim.x == kPad / 2. Starts and ends with a barrier.
template <int kPad>
__device__ void bitonic_sort(double* key, int* index) {
  const int t = threadIdx.x;
  __syncthreads();
  for (int size = 2; size <= kPad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      // Thread t owns the pair (lo, lo + stride), lo = t with a zero inserted at bit `stride`: the kPad / 2
      // pairs of a step are disjoint, so no two threads touch the same element between barriers.
      const int lo = 2 * t - (t & (stride - 1));
      const int hi = lo + stride;
      const bool ascending = (lo & size) == 0;  // the final merge (size == kPad) is ascending everywhere
      const double key_lo = key[lo], key_hi = key[hi];
      const int index_lo = index[lo], index_hi = index[hi];
      if (comes_first(key_hi, index_hi, key_lo, index_lo) == ascending) {
        key[lo] = key_hi;
        key[hi] = key_lo;
        index[lo] = index_hi;
        index[hi] = index_lo;
      }
      __syncthreads();
    }
  }
}

// Slots [0, Nv) get the tokens' rank keys; slots [Nv, kPad) get (-inf, slot) sentinels, which come after
// every token (a token's key is >= -inf and its index < Nv), so sorted positions [0, Nv) hold the tokens.
template <int kPad>
__device__ void load_keys(const Score& score, int64_t row, int num_visual, double* key, int* index) {
  for (int p = threadIdx.x; p < kPad; p += kPad / 2) {
    key[p] = p < num_visual ? score.key(row + p) : -INFINITY;
    index[p] = p;
  }
}

template <int kPad>
__global__ void __launch_bounds__(kPad / 2)
    select_block_kernel(Score attn, Score info, int num_visual, int k1, double lam, int64_t* __restrict__ order) {
  constexpr int kThreads = kPad / 2;
  __shared__ double key[kPad];
  __shared__ int index[kPad];
  __shared__ int rank_attn[kPad];
  const int64_t image = blockIdx.x;
  const int64_t row = image * num_visual;

  load_keys<kPad>(attn, row, num_visual, key, index);
  bitonic_sort<kPad>(key, index);
  for (int p = threadIdx.x; p < num_visual; p += kThreads) rank_attn[index[p]] = p;
  __syncthreads();  // the loop above reads index[], which the next load overwrites

  load_keys<kPad>(info, row, num_visual, key, index);
  bitonic_sort<kPad>(key, index);
  // Position p now holds the token whose information rank is p. Replace its key by its fused score in
  // place (each thread rewrites only the slots it reads); the sentinels in [Nv, kPad) keep -inf, below every
  // fused score (both ranks are below Nv, so s >= lam + (1 - lam) = 1).
  const double nv = static_cast<double>(num_visual);
  for (int p = threadIdx.x; p < num_visual; p += kThreads) key[p] = fused_score(lam, nv, rank_attn[index[p]], p);
  bitonic_sort<kPad>(key, index);

  for (int p = threadIdx.x; p < k1; p += kThreads) order[image * k1 + p] = index[p];
}

template <int kPad>
void launch_block(const Score& attn, const Score& info, int64_t batch, int num_visual, int k1, double lam,
                  int64_t* order, cudaStream_t stream) {
  select_block_kernel<kPad><<<cuda::grid_size(batch, kSelect), kPad / 2, 0, stream>>>(attn, info, num_visual, k1,
                                                                                    lam, order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- Nv > kBlockMaxNv: rank counting over the grid ----

constexpr int kRankTile = 256;   // tokens per block (one per thread), and keys per shared-memory tile
constexpr int kRankSpan = 2048;  // keys j a block compares against: Nv / kRankSpan blocks per token tile

// The fused score of token j, from the two ranks counted before.
struct FusedKey {
  const int* rank_attn;  // [B, Nv]
  const int* rank_info;  // [B, Nv]
  double lam;
  double nv;

  __device__ __forceinline__ double key(int64_t i) const { return fused_score(lam, nv, rank_attn[i], rank_info[i]); }
};

// rank[b, i] += #{j in this block's span : (key_j, j) comes before (key_i, i)}; rank must start at zero.
template <typename Keys>
__global__ void __launch_bounds__(kRankTile)
    count_ranks_kernel(Keys keys, int num_visual, int token_tiles, int spans, int* __restrict__ rank) {
  __shared__ double tile[kRankTile];
  const int64_t block = blockIdx.x;
  const int token_tile = static_cast<int>(block % token_tiles);
  const int span = static_cast<int>((block / token_tiles) % spans);
  const int64_t image = block / (static_cast<int64_t>(token_tiles) * spans);
  const int64_t row = image * num_visual;

  const int i = token_tile * kRankTile + static_cast<int>(threadIdx.x);
  const double key_i = i < num_visual ? keys.key(row + i) : 0.0;
  const int span_begin = span * kRankSpan;
  const int span_end = min(num_visual, span_begin + kRankSpan);
  int count = 0;
  for (int j0 = span_begin; j0 < span_end; j0 += kRankTile) {
    const int j = j0 + static_cast<int>(threadIdx.x);
    if (j < span_end) tile[threadIdx.x] = keys.key(row + j);
    __syncthreads();
    const int n = min(kRankTile, span_end - j0);
    for (int jj = 0; jj < n; ++jj) count += comes_first(tile[jj], j0 + jj, key_i, i);
    __syncthreads();  // the tile is reloaded next iteration
  }
  if (i < num_visual && count > 0) atomicAdd(rank + row + i, count);
}

__global__ void scatter_order_kernel(const int* __restrict__ position, int64_t batch, int num_visual, int k1,
                                     int64_t* __restrict__ order) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= batch * num_visual) return;
  const int64_t image = g / num_visual;
  const int p = position[g];
  if (p < k1) order[image * k1 + p] = g - image * num_visual;
}

template <typename Keys>
void launch_count(const Keys& keys, int64_t batch, int num_visual, int* rank, cudaStream_t stream) {
  const int token_tiles = static_cast<int>(cuda::ceil_div(num_visual, kRankTile));
  const int spans = static_cast<int>(cuda::ceil_div(num_visual, kRankSpan));
  const unsigned int blocks = cuda::grid_size(batch * token_tiles * spans, kSelect);
  count_ranks_kernel<Keys><<<blocks, kRankTile, 0, stream>>>(keys, num_visual, token_tiles, spans, rank);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_counting(const Score& attn, const Score& info, const at::Tensor& scratch, int64_t batch, int num_visual,
                     int k1, double lam, int64_t* order, cudaStream_t stream) {
  int* rank_attn = scratch.data_ptr<int>();
  int* rank_info = rank_attn + batch * num_visual;
  int* position = rank_info + batch * num_visual;
  launch_count(attn, batch, num_visual, rank_attn, stream);
  launch_count(info, batch, num_visual, rank_info, stream);
  launch_count(FusedKey{rank_attn, rank_info, lam, static_cast<double>(num_visual)}, batch, num_visual, position,
               stream);
  constexpr int kThreads = 256;
  scatter_order_kernel<<<cuda::grid_size(cuda::ceil_div(batch * num_visual, kThreads), kSelect), kThreads, 0,
                         stream>>>(position, batch, num_visual, k1, order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor select_cuda(const at::Tensor& attn, const at::Tensor& info, int64_t budget, double attn_weight) {
  check_select(attn, info, budget, attn_weight);
  const int64_t batch = attn.size(0), num_visual = attn.size(1);
  cuda::check_int32_sizes(num_visual, kSelect);
  const int64_t k1 = budget_split(num_visual, budget).k1;
  const c10::cuda::CUDAGuard guard(attn.device());
  at::Tensor order = at::empty({batch, k1}, attn.options().dtype(at::kLong));
  if (order.numel() == 0) return order;  // B = 0 or Nv = 0: nothing to launch
  const at::Tensor a = attn.contiguous();
  const at::Tensor c = info.contiguous();
  const Score attn_score{a.data_ptr(), score_dtype(a)};
  const Score info_score{c.data_ptr(), score_dtype(c)};
  const int nv = static_cast<int>(num_visual), k = static_cast<int>(k1);
  int64_t* out = order.data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (nv <= 64) launch_block<64>(attn_score, info_score, batch, nv, k, attn_weight, out, stream);
  else if (nv <= 128) launch_block<128>(attn_score, info_score, batch, nv, k, attn_weight, out, stream);
  else if (nv <= 256) launch_block<256>(attn_score, info_score, batch, nv, k, attn_weight, out, stream);
  else if (nv <= 512) launch_block<512>(attn_score, info_score, batch, nv, k, attn_weight, out, stream);
  else if (nv <= 1024) launch_block<1024>(attn_score, info_score, batch, nv, k, attn_weight, out, stream);
  else if (nv <= kBlockMaxNv) launch_block<kBlockMaxNv>(attn_score, info_score, batch, nv, k, attn_weight, out, stream);
  else {
    // rank_attn, rank_info and the fused rank, [3, B, Nv] int32, zeroed for the atomic counts.
    const at::Tensor scratch = at::zeros({3, batch, num_visual}, attn.options().dtype(at::kInt));
    launch_counting(attn_score, info_score, scratch, batch, nv, k, attn_weight, out, stream);
  }
  return order;
}

}  // namespace tokencarve
