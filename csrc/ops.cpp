// The tokencarve operator library, registered in this one file: every schema, the Meta kernels that give
// output shapes (torch.compile, FakeTensor, CUDA-graph capture), the composite ops (carve composed from the
// stages through the dispatcher, so each device's stage kernels are picked up wherever they are registered;
// carve_varlen; gather_kv), and the device kernels declared in kernels.h: C++ CPU kernels (csrc/cpu) and,
// in a CUDA build, the C++ CUDA kernels of select and merge (csrc/cuda). The CUDA kernels of the score ops
// are Triton kernels that tokencarve_kernels registers from Python.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "kernels.h"

namespace tokencarve {
namespace {

// ---- Meta kernels: the same checks as the real kernels, then outputs of the right shape. ----

at::Tensor info_scores_meta(const at::Tensor& hidden, int64_t rank, int64_t seed) {
  check_info_scores(hidden, rank, seed);
  return at::empty({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kFloat));
}

at::Tensor last_query_attention_meta(const at::Tensor& q, const at::Tensor& k, int64_t vis_start, int64_t vis_len,
                                     double scale) {
  check_last_query_attention(q, k, vis_start, vis_len, scale);
  return at::empty({q.size(0), vis_len}, q.options().dtype(at::kFloat));
}

at::Tensor select_meta(const at::Tensor& attn, const at::Tensor& info, int64_t budget, double attn_weight) {
  check_select(attn, info, budget, attn_weight);
  const auto split = budget_split(attn.size(1), budget);
  return at::empty({attn.size(0), split.k1}, attn.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_meta(const at::Tensor& hidden, const at::Tensor& order,
                                                          int64_t budget, c10::string_view mode,
                                                          const std::optional<at::Tensor>& sizes) {
  check_merge(hidden, order, budget, mode, sizes);
  const int64_t batch = hidden.size(0);
  const auto split = budget_split(hidden.size(1), budget);
  return {at::empty({batch, split.t_out, hidden.size(2)}, hidden.options()),
          at::empty({batch, split.t_out}, hidden.options().dtype(at::kLong)),
          at::empty({batch, split.t_out}, hidden.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> carve_meta(const at::Tensor& hidden, const at::Tensor& attn, int64_t budget,
                                              double attn_weight, int64_t rank, int64_t seed,
                                              c10::string_view merge) {
  check_carve(hidden, attn, budget, attn_weight, rank, seed, merge);
  const auto split = budget_split(hidden.size(1), budget);
  return {at::empty({hidden.size(0), split.t_out, hidden.size(2)}, hidden.options()),
          at::empty({hidden.size(0), split.t_out}, hidden.options().dtype(at::kLong))};
}

// ---- carve: the stages through the dispatcher (one implementation for every device). ----

std::tuple<at::Tensor, at::Tensor> carve_composite(const at::Tensor& hidden, const at::Tensor& attn, int64_t budget,
                                                   double attn_weight, int64_t rank, int64_t seed,
                                                   c10::string_view merge) {
  check_carve(hidden, attn, budget, attn_weight, rank, seed, merge);
  static auto info_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow(kInfo, "")
                            .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  static auto select_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow(kSelect, "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>();
  static auto merge_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(kMerge, "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                c10::string_view, const std::optional<at::Tensor>&)>();
  // Keep-all (budget >= Nv) is the identity: no score is read, so none is computed. A copy, not a view:
  // an op's outputs never alias its inputs.
  const int64_t batch = hidden.size(0), num_visual = hidden.size(1);
  if (budget >= num_visual) {
    return {hidden.clone(at::MemoryFormat::Contiguous),
            at::arange(num_visual, attn.options().dtype(at::kLong)).expand({batch, num_visual}).contiguous()};
  }
  // Attention-only fusion (attn_weight = 1) never reads the information score: skip computing it.
  const at::Tensor info = attn_weight == 1.0 ? at::zeros(attn.sizes(), attn.options().dtype(at::kFloat))
                                             : info_op.call(hidden, rank, seed);
  const at::Tensor order = select_op.call(attn, info, budget, attn_weight);
  auto [carved, keep_idx, sizes] = merge_op.call(hidden, order, budget, merge, std::nullopt);
  return {carved, keep_idx};
}

at::Tensor last_query_attention_varlen_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                            double scale) {
  check_last_query_attention_varlen(q, k, cu_seqlens, scale);
  return at::empty({k.size(0)}, q.options().dtype(at::kFloat));
}

int64_t varlen_output_rows(at::IntArrayRef seqlens, at::IntArrayRef budgets) {
  int64_t rows = 0;
  for (size_t i = 0; i < seqlens.size(); ++i) rows += budget_split(seqlens[i], budgets[i]).t_out;
  return rows;
}

std::tuple<at::Tensor, at::Tensor> carve_varlen_meta(const at::Tensor& hidden, const at::Tensor& attn,
                                                     at::IntArrayRef seqlens, at::IntArrayRef budgets,
                                                     double attn_weight, int64_t rank, int64_t seed,
                                                     c10::string_view merge) {
  check_carve_varlen(hidden, attn, seqlens, budgets, attn_weight, rank, seed, merge);
  const int64_t rows = varlen_output_rows(seqlens, budgets);
  return {at::empty({rows, hidden.size(1)}, hidden.options()), at::empty({rows}, hidden.options().dtype(at::kLong))};
}

// Each image through carve on its own (a different Nv per image is the point of the varlen form).
std::tuple<at::Tensor, at::Tensor> carve_varlen_composite(const at::Tensor& hidden, const at::Tensor& attn,
                                                          at::IntArrayRef seqlens, at::IntArrayRef budgets,
                                                          double attn_weight, int64_t rank, int64_t seed,
                                                          c10::string_view merge) {
  check_carve_varlen(hidden, attn, seqlens, budgets, attn_weight, rank, seed, merge);
  static auto carve_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(kCarve, "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                       double, int64_t, int64_t, c10::string_view)>();
  std::vector<at::Tensor> carved, keep;
  int64_t offset = 0;
  for (size_t i = 0; i < seqlens.size(); ++i) {
    auto [c, k] = carve_op.call(hidden.narrow(0, offset, seqlens[i]).unsqueeze(0),
                                attn.narrow(0, offset, seqlens[i]).unsqueeze(0), budgets[i], attn_weight, rank, seed,
                                merge);
    carved.push_back(c.squeeze(0));
    keep.push_back(k.squeeze(0));
    offset += seqlens[i];
  }
  if (carved.empty())
    return {at::empty({0, hidden.size(1)}, hidden.options()), at::empty({0}, hidden.options().dtype(at::kLong))};
  return {at::cat(carved), at::cat(keep)};
}

at::Tensor gather_kv_meta(const at::Tensor& kv, const at::Tensor& keep_idx, const at::Tensor& vis_start,
                          int64_t vis_len) {
  check_gather_kv(kv, keep_idx, vis_start, vis_len);
  return at::empty({kv.size(0), kv.size(1), kv.size(2) - vis_len + keep_idx.size(1), kv.size(3)}, kv.options());
}

// positions [B, N - vis_len + T] of the tokens that survive, then one gather along N. Works on every device;
// on the CPU the index values are verified first (a device gather asserts on out-of-range indices itself).
at::Tensor gather_kv_composite(const at::Tensor& kv, const at::Tensor& keep_idx, const at::Tensor& vis_start,
                               int64_t vis_len) {
  check_gather_kv(kv, keep_idx, vis_start, vis_len);
  const int64_t batch = kv.size(0), seq_len = kv.size(2), t = keep_idx.size(1);
  if (kv.device().is_cpu()) {
    TORCH_CHECK_VALUE(batch == 0 || (vis_start.min().item<int64_t>() >= 0 &&
                                     vis_start.max().item<int64_t>() + vis_len <= seq_len),
                      kGatherKv, ": every visual span [vis_start, vis_start + vis_len) must lie inside the N = ",
                      seq_len, " tokens");
    TORCH_CHECK_VALUE(keep_idx.numel() == 0 || (keep_idx.min().item<int64_t>() >= 0 &&
                                                keep_idx.max().item<int64_t>() < vis_len),
                      kGatherKv, ": keep_idx must hold indices in [0, vis_len = ", vis_len, ")");
  }
  const at::Tensor p = at::arange(seq_len - vis_len + t, keep_idx.options()).unsqueeze(0).expand({batch, -1});
  const at::Tensor start = vis_start.unsqueeze(1);
  const at::Tensor in_span_idx = (p - start).clamp(0, std::max<int64_t>(t - 1, 0));
  const at::Tensor span_pos = t > 0 ? start + keep_idx.gather(1, in_span_idx) : p;
  const at::Tensor pos = at::where(p < start, p, at::where(p < start + t, span_pos, p - t + vis_len));
  const int64_t out_len = seq_len - vis_len + t;  // explicit: a view of B = 0 rows cannot infer a -1
  return kv.gather(2, pos.view({batch, 1, out_len, 1}).expand({batch, kv.size(1), out_len, kv.size(3)}));
}

}  // namespace

TORCH_LIBRARY(tokencarve, m) {
  m.def(
      "info_scores(Tensor hidden, int rank=0, int seed=0) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "last_query_attention(Tensor q, Tensor k, int vis_start, int vis_len, float scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "select(Tensor attn, Tensor info, int budget, float attn_weight=0.5) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "merge(Tensor hidden, Tensor order, int budget, str mode=\"mean\", Tensor? sizes=None)"
      " -> (Tensor carved, Tensor keep_idx, Tensor carved_sizes)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "carve(Tensor hidden, Tensor attn, int budget, float attn_weight=0.5, int rank=0, int seed=0,"
      " str merge=\"mean\") -> (Tensor carved, Tensor keep_idx)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "last_query_attention_varlen(Tensor q, Tensor k, Tensor cu_seqlens, float scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "carve_varlen(Tensor hidden, Tensor attn, int[] seqlens, int[] budgets, float attn_weight=0.5, int rank=0,"
      " int seed=0, str merge=\"mean\") -> (Tensor carved, Tensor keep_idx)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "gather_kv(Tensor kv, Tensor keep_idx, Tensor vis_start, int vis_len) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(tokencarve, Meta, m) {
  m.impl("info_scores", &info_scores_meta);
  m.impl("last_query_attention", &last_query_attention_meta);
  m.impl("select", &select_meta);
  m.impl("merge", &merge_meta);
  m.impl("carve", &carve_meta);
  m.impl("last_query_attention_varlen", &last_query_attention_varlen_meta);
  m.impl("carve_varlen", &carve_varlen_meta);
  m.impl("gather_kv", &gather_kv_meta);
}

TORCH_LIBRARY_IMPL(tokencarve, CompositeExplicitAutograd, m) {
  m.impl("carve", &carve_composite);
  m.impl("carve_varlen", &carve_varlen_composite);
  m.impl("gather_kv", &gather_kv_composite);
}

TORCH_LIBRARY_IMPL(tokencarve, CPU, m) {
  m.impl("info_scores", &info_scores_cpu);
  m.impl("last_query_attention", &last_query_attention_cpu);
  m.impl("last_query_attention_varlen", &last_query_attention_varlen_cpu);
  m.impl("select", &select_cpu);
  m.impl("merge", &merge_cpu);
}

#ifdef TOKENCARVE_WITH_CUDA
TORCH_LIBRARY_IMPL(tokencarve, CUDA, m) {
  m.impl("select", &select_cuda);
  m.impl("merge", &merge_cuda);
}
#endif

}  // namespace tokencarve

#ifdef TOKENCARVE_PYTHON_MODULE
// `import tokencarve_kernels._C` loads this library, whose static initialisers register the ops.
#include <Python.h>
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "tokencarve operator library", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
