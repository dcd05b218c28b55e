// Argument checks and stage sizes shared by every kernel (CPU, CUDA, Meta) of the tokencarve ops.
// Every check reads only metadata (shape, dtype, device): none of them syncs with a device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string_view>

namespace tokencarve {

constexpr const char* kCarve = "tokencarve::carve";
constexpr const char* kInfo = "tokencarve::info_scores";
constexpr const char* kLqa = "tokencarve::last_query_attention";
constexpr const char* kSelect = "tokencarve::select";
constexpr const char* kMerge = "tokencarve::merge";
constexpr const char* kLqaVarlen = "tokencarve::last_query_attention_varlen";
constexpr const char* kCarveVarlen = "tokencarve::carve_varlen";
constexpr const char* kGatherKv = "tokencarve::gather_kv";

// Sizes of every stage for one image (SPEC.md; python_ref.budget_split), a pure function of (Nv, T).
struct BudgetSplit {
  int64_t t_out;  // tokens out of carve: min(budget, Nv)
  int64_t k1;     // stage-I survivors: min(int(1.5 T), Nv), or Nv when T >= Nv
  int64_t n_a;    // merge destinations (set A): int(K1 / 2)
  int64_t r;      // sources merged in stage II: K1 - T_out
};

inline BudgetSplit budget_split(int64_t num_visual, int64_t budget) {
  if (budget >= num_visual) return {num_visual, num_visual, num_visual / 2, 0};
  const int64_t k1 = std::min((3 * budget) / 2, num_visual);
  return {budget, k1, k1 / 2, k1 - budget};
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
                   t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor ", layout, ", got ",
                    t.dim(), "-D with shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b,
                              const char* op) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_budget(int64_t budget, const char* op) {
  TORCH_CHECK_VALUE(budget >= 1, op, ": budget must be >= 1, got ", budget);
}

inline void check_attn_weight(double attn_weight, const char* op) {
  TORCH_CHECK_VALUE(attn_weight >= 0.0 && attn_weight <= 1.0, op, ": attn_weight must be in [0, 1], got ",
                    attn_weight);
}

inline void check_rank_seed(int64_t rank, int64_t seed, const char* op) {
  TORCH_CHECK_VALUE(rank >= 0, op, ": rank must be >= 0 (0 = exact scores), got ", rank);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be >= 0, got ", seed);
}

enum class MergeMode { kMean = 0, kSimilarity = 1, kSize = 2 };

inline MergeMode parse_merge_mode(std::string_view mode, const char* op) {
  if (mode == "mean") return MergeMode::kMean;
  if (mode == "similarity") return MergeMode::kSimilarity;
  if (mode == "size") return MergeMode::kSize;
  TORCH_CHECK_VALUE(false, op, ": merge must be one of 'mean', 'similarity', 'size', got '", mode, "'");
}

// hidden [B, Nv, D] floating.
inline void check_hidden(const at::Tensor& hidden, const char* op) {
  check_dim(hidden, 3, op, "hidden", "[B, Nv, D]");
  check_float(hidden, op, "hidden");
}

// A per-token score [B, Nv] matching hidden (or another score).
inline void check_score(const at::Tensor& score, const char* name, int64_t batch, int64_t num_visual,
                        const char* op) {
  check_dim(score, 2, op, name, "[B, Nv]");
  check_float(score, op, name);
  TORCH_CHECK_VALUE(score.size(0) == batch && score.size(1) == num_visual, op, ": ", name,
                    " must have shape [B, Nv] = [", batch, ", ", num_visual, "], got ", score.sizes());
}

// order [B, K1] int64, as returned by select for (Nv, budget).
inline void check_order(const at::Tensor& order, int64_t batch, int64_t k1, const char* op) {
  check_dim(order, 2, op, "order", "[B, K1]");
  TORCH_CHECK_TYPE(order.scalar_type() == at::kLong, op, ": order must be int64, got ", order.scalar_type());
  TORCH_CHECK_VALUE(order.size(0) == batch && order.size(1) == k1, op,
                    ": order must have shape [B, K1] = [", batch, ", ", k1,
                    "] (K1 = min(int(1.5 * budget), Nv), as select returns), got ", order.sizes());
}

// ---- One check per op, called by that op's kernel on every device. ----

// Randomized information scores: oversampling and power iterations (python_ref/info_scores.py holds the
// same two numbers, and why these), and the sketch width l = min(min(rank, m) + oversampling, m), m = min(Nv, D).
constexpr int64_t kOversampling = 0;
constexpr int64_t kPowerIterations = 1;

inline int64_t sketch_cols(int64_t num_visual, int64_t dim, int64_t rank) {
  const int64_t m = std::min(num_visual, dim);
  return std::min(std::min(rank, m) + kOversampling, m);
}

inline void check_info_scores(const at::Tensor& hidden, int64_t rank, int64_t seed) {
  check_hidden(hidden, kInfo);
  check_rank_seed(rank, seed, kInfo);
  // The sketch's Philox offsets are int32 on every device.
  TORCH_CHECK_VALUE(rank == 0 || hidden.size(2) * sketch_cols(hidden.size(1), hidden.size(2), rank) < (int64_t{1} << 31),
                    kInfo, ": the randomized sketch D x (rank + oversampling) must hold fewer than 2^31 entries");
}

inline void check_select(const at::Tensor& attn, const at::Tensor& info, int64_t budget, double attn_weight) {
  check_dim(attn, 2, kSelect, "attn", "[B, Nv]");
  check_float(attn, kSelect, "attn");
  check_score(info, "info", attn.size(0), attn.size(1), kSelect);
  check_same_device(attn, "attn", info, "info", kSelect);
  check_budget(budget, kSelect);
  check_attn_weight(attn_weight, kSelect);
}

inline MergeMode check_merge(const at::Tensor& hidden, const at::Tensor& order, int64_t budget,
                             std::string_view mode, const std::optional<at::Tensor>& sizes) {
  check_hidden(hidden, kMerge);
  check_budget(budget, kMerge);
  const MergeMode parsed = parse_merge_mode(mode, kMerge);
  const int64_t batch = hidden.size(0), num_visual = hidden.size(1);
  check_order(order, batch, budget_split(num_visual, budget).k1, kMerge);
  check_same_device(hidden, "hidden", order, "order", kMerge);
  if (sizes.has_value()) {
    check_score(*sizes, "sizes", batch, num_visual, kMerge);
    check_same_device(hidden, "hidden", *sizes, "sizes", kMerge);
  }
  return parsed;
}

inline void check_carve(const at::Tensor& hidden, const at::Tensor& attn, int64_t budget, double attn_weight,
                        int64_t rank, int64_t seed, std::string_view merge) {
  check_hidden(hidden, kCarve);
  check_score(attn, "attn", hidden.size(0), hidden.size(1), kCarve);
  check_same_device(hidden, "hidden", attn, "attn", kCarve);
  check_budget(budget, kCarve);
  check_attn_weight(attn_weight, kCarve);
  check_rank_seed(rank, seed, kCarve);
  parse_merge_mode(merge, kCarve);
}

// q [B, Hq, d], k [B, Hk, N, d], the visual span inside the N keys.
inline void check_last_query_attention(const at::Tensor& q, const at::Tensor& k, int64_t vis_start,
                                       int64_t vis_len, double scale) {
  const char* op = kLqa;
  check_dim(q, 3, op, "q", "[B, Hq, d]");
  check_dim(k, 4, op, "k", "[B, Hk, N, d]");
  check_float(q, op, "q");
  check_float(k, op, "k");
  check_same_device(q, "q", k, "k", op);
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type(), op, ": q and k must have the same dtype, got ",
                   q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0), op, ": q and k must have the same batch size, got ", q.size(0),
                    " and ", k.size(0));
  TORCH_CHECK_VALUE(q.size(2) == k.size(3), op, ": q and k must have the same head dim, got ", q.size(2),
                    " and ", k.size(3));
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op,
                    ": the number of query heads Hq must be a positive multiple of the key heads Hk, got Hq=",
                    q.size(1), ", Hk=", k.size(1));
  const int64_t num_keys = k.size(2);
  TORCH_CHECK_VALUE(vis_start >= 0 && vis_len >= 0 && vis_start + vis_len <= num_keys, op,
                    ": the visual span [vis_start, vis_start + vis_len) = [", vis_start, ", ", vis_start + vis_len,
                    ") must lie inside the N = ", num_keys, " keys");
  TORCH_CHECK_VALUE(num_keys >= 1 || q.size(0) == 0, op, ": k must hold at least one key");
  TORCH_CHECK_VALUE(scale > 0.0, op, ": scale must be > 0, got ", scale);
}

// q [S, Hq, d], k [total, Hk, d], cu_seqlens [S + 1] int32/int64 (values are the caller's promise:
// non-decreasing from 0 to at most total; CPU kernels verify them, device kernels cannot without a sync).
inline void check_last_query_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                              double scale) {
  const char* op = kLqaVarlen;
  check_dim(q, 3, op, "q", "[S, Hq, d]");
  check_dim(k, 3, op, "k", "[total, Hk, d]");
  check_dim(cu_seqlens, 1, op, "cu_seqlens", "[S + 1]");
  check_float(q, op, "q");
  check_float(k, op, "k");
  check_same_device(q, "q", k, "k", op);
  check_same_device(q, "q", cu_seqlens, "cu_seqlens", op);
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type(), op, ": q and k must have the same dtype, got ",
                   q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong, op,
                   ": cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.size(0) == q.size(0) + 1, op, ": cu_seqlens must have S + 1 = ", q.size(0) + 1,
                    " entries (one sequence per query), got ", cu_seqlens.size(0));
  TORCH_CHECK_VALUE(q.size(2) == k.size(2), op, ": q and k must have the same head dim, got ", q.size(2), " and ",
                    k.size(2));
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op,
                    ": the number of query heads Hq must be a positive multiple of the key heads Hk, got Hq=",
                    q.size(1), ", Hk=", k.size(1));
  TORCH_CHECK_VALUE(scale > 0.0, op, ": scale must be > 0, got ", scale);
}

// hidden [sum Nv_i, D], attn [sum Nv_i], one budget per image.
inline void check_carve_varlen(const at::Tensor& hidden, const at::Tensor& attn, at::IntArrayRef seqlens,
                               at::IntArrayRef budgets, double attn_weight, int64_t rank, int64_t seed,
                               std::string_view merge) {
  const char* op = kCarveVarlen;
  check_dim(hidden, 2, op, "hidden", "[sum Nv_i, D]");
  check_dim(attn, 1, op, "attn", "[sum Nv_i]");
  check_float(hidden, op, "hidden");
  check_float(attn, op, "attn");
  check_same_device(hidden, "hidden", attn, "attn", op);
  TORCH_CHECK_VALUE(seqlens.size() == budgets.size(), op, ": seqlens and budgets must have one entry per image, got ",
                    seqlens.size(), " and ", budgets.size());
  int64_t total = 0;
  for (size_t i = 0; i < seqlens.size(); ++i) {
    TORCH_CHECK_VALUE(seqlens[i] >= 0, op, ": seqlens[", i, "] must be >= 0, got ", seqlens[i]);
    TORCH_CHECK_VALUE(budgets[i] >= 1, op, ": budgets[", i, "] must be >= 1, got ", budgets[i]);
    total += seqlens[i];
  }
  TORCH_CHECK_VALUE(hidden.size(0) == total && attn.size(0) == total, op,
                    ": hidden and attn must hold sum(seqlens) = ", total, " rows, got ", hidden.size(0), " and ",
                    attn.size(0));
  check_attn_weight(attn_weight, op);
  check_rank_seed(rank, seed, op);
  parse_merge_mode(merge, op);
}

// kv [B, H, N, d] any dtype, keep_idx [B, T] int64, vis_start [B] int64, T <= vis_len <= N.
inline void check_gather_kv(const at::Tensor& kv, const at::Tensor& keep_idx, const at::Tensor& vis_start,
                            int64_t vis_len) {
  const char* op = kGatherKv;
  check_dim(kv, 4, op, "kv", "[B, H, N, d]");
  check_dim(keep_idx, 2, op, "keep_idx", "[B, T]");
  check_dim(vis_start, 1, op, "vis_start", "[B]");
  TORCH_CHECK_TYPE(keep_idx.scalar_type() == at::kLong, op, ": keep_idx must be int64, got ", keep_idx.scalar_type());
  TORCH_CHECK_TYPE(vis_start.scalar_type() == at::kLong, op, ": vis_start must be int64, got ",
                   vis_start.scalar_type());
  check_same_device(kv, "kv", keep_idx, "keep_idx", op);
  check_same_device(kv, "kv", vis_start, "vis_start", op);
  TORCH_CHECK_VALUE(keep_idx.size(0) == kv.size(0) && vis_start.size(0) == kv.size(0), op,
                    ": kv, keep_idx and vis_start must have the same batch size, got ", kv.size(0), ", ",
                    keep_idx.size(0), " and ", vis_start.size(0));
  TORCH_CHECK_VALUE(vis_len >= keep_idx.size(1) && vis_len <= kv.size(2), op,
                    ": vis_len must lie in [T, N] = [", keep_idx.size(1), ", ", kv.size(2), "], got ", vis_len);
}

}  // namespace tokencarve
