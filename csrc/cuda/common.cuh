// Device helpers shared by the CUDA kernels of the tokencarve ops (select.cu, merge.cu).
//
// Every launch goes to the current stream of the input's device (c10::cuda::getCurrentCUDAStream), every
// scratch buffer comes from the caching allocator (at::empty), and no kernel's grid depends on tensor values:
// the ops never sync with the host and can be captured in a CUDA graph.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace tokencarve::cuda {

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Token and slot indices are int32 inside the kernels (shared memory, shuffles); the outputs are int64.
inline void check_int32_sizes(int64_t num_visual, const char* op) {
  TORCH_CHECK_VALUE(num_visual < std::numeric_limits<int32_t>::max(), op, ": Nv must be below 2^31 on CUDA, got ",
                    num_visual);
}

// Grids are one-dimensional (x allows 2^31 - 1 blocks; y and z only 65535): a launch of more blocks than
// that is refused with a message instead of failing inside the driver.
inline unsigned int grid_size(int64_t blocks, const char* op) {
  TORCH_CHECK_VALUE(blocks > 0 && blocks <= std::numeric_limits<int32_t>::max(), op,
                    ": the input is too large for one CUDA launch (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

// True when (key_a, index_a) comes before (key_b, index_b) in a descending order whose ties go to the lower
// index: SPEC.md's rule for ranks, for the fused score and for the merge order. Keys are never NaN here
// (callers map non-finite scores to -inf), so with distinct indices this is a total order: any correct
// sort or rank count gives exactly the one answer a stable descending sort gives.
template <typename Key>
__device__ __forceinline__ bool comes_first(Key key_a, int index_a, Key key_b, int index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

}  // namespace tokencarve::cuda
