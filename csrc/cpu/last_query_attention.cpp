// last_query_attention on the CPU: the last token's attention row over all N keys, mean over query
// heads, visual columns only. One [B, Hq, N] logit row per head; never an N x N matrix.

#include <ATen/ATen.h>
#include "../checks.h"
#include "../kernels.h"

namespace tokencarve {

at::Tensor last_query_attention_cpu(const at::Tensor& q, const at::Tensor& k, int64_t vis_start, int64_t vis_len,
                                    double scale) {
  check_last_query_attention(q, k, vis_start, vis_len, scale);
  const int64_t batch = q.size(0), heads_q = q.size(1), head_dim = q.size(2);
  const int64_t heads_k = k.size(1), num_keys = k.size(2);
  if (batch == 0 || vis_len == 0) return at::zeros({batch, vis_len}, q.options().dtype(at::kFloat));
  // Query head h reads key head h / g: group the query heads under their key head.
  const at::Tensor qg = q.to(at::kFloat).reshape({batch, heads_k, heads_q / heads_k, head_dim});
  const at::Tensor logits = at::matmul(qg, k.to(at::kFloat).transpose(-1, -2)) * scale;  // [B, Hk, g, N]
  const at::Tensor probs = at::softmax(logits, -1, at::kDouble).reshape({batch, heads_q, num_keys});
  return probs.narrow(2, vis_start, vis_len).mean(1).to(at::kFloat);
}

at::Tensor last_query_attention_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                           double scale) {
  check_last_query_attention_varlen(q, k, cu_seqlens, scale);
  const int64_t num_seqs = q.size(0), total = k.size(0);
  const at::Tensor bounds = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* cu = bounds.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(cu[0] == 0 && cu[num_seqs] <= total, kLqaVarlen, ": cu_seqlens must start at 0 and end at most at ",
                    "the number of keys ", total, ", got ", cu[0], " .. ", cu[num_seqs]);
  for (int64_t s = 0; s < num_seqs; ++s)
    TORCH_CHECK_VALUE(cu[s] <= cu[s + 1], kLqaVarlen, ": cu_seqlens must be non-decreasing, got ", cu[s], " then ",
                      cu[s + 1], " at sequence ", s);
  at::Tensor out = at::zeros({total}, q.options().dtype(at::kFloat));
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t n = cu[s + 1] - cu[s];
    if (n == 0) continue;
    const at::Tensor keys = k.narrow(0, cu[s], n).permute({1, 0, 2}).unsqueeze(0);  // [1, Hk, n, d]
    out.narrow(0, cu[s], n).copy_(last_query_attention_cpu(q.narrow(0, s, 1), keys, 0, n, scale).squeeze(0));
  }
  return out;
}

}  // namespace tokencarve
