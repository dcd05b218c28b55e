// Every device kernel of the tokencarve ops, declared once. csrc/ops.cpp registers them (the one
// registration file); csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu define them. Each kernel runs the op's
// argument check from checks.h first, so every device raises the same errors.
//
// CUDA kernels of info_scores, last_query_attention and last_query_attention_varlen are Triton kernels,
// registered from Python (tokencarve_kernels); the C++ CUDA kernels are the two stages below.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace tokencarve {

// hidden [B, Nv, D] -> [B, Nv] float32.
at::Tensor info_scores_cpu(const at::Tensor& hidden, int64_t rank, int64_t seed);

// q [B, Hq, d], k [B, Hk, N, d] -> [B, vis_len] float32.
at::Tensor last_query_attention_cpu(const at::Tensor& q, const at::Tensor& k, int64_t vis_start, int64_t vis_len,
                                    double scale);

// q [S, Hq, d], k [total, Hk, d], cu_seqlens [S + 1] -> [total] float32.
at::Tensor last_query_attention_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                           double scale);

// attn [B, Nv], info [B, Nv] -> order [B, K1] int64.
at::Tensor select_cpu(const at::Tensor& attn, const at::Tensor& info, int64_t budget, double attn_weight);

// hidden [B, Nv, D], order [B, K1] -> carved [B, T, D], keep_idx [B, T] int64, carved_sizes [B, T] float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cpu(const at::Tensor& hidden, const at::Tensor& order,
                                                         int64_t budget, c10::string_view mode,
                                                         const std::optional<at::Tensor>& sizes);

#ifdef TOKENCARVE_WITH_CUDA
at::Tensor select_cuda(const at::Tensor& attn, const at::Tensor& info, int64_t budget, double attn_weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_cuda(const at::Tensor& hidden, const at::Tensor& order,
                                                          int64_t budget, c10::string_view mode,
                                                          const std::optional<at::Tensor>& sizes);
#endif

}  // namespace tokencarve
