// Row helpers shared by the CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace tokencarve {

// Whether row [dim] holds only finite values; a row that does not (NaN, +-Inf) is zeroed. Written so that it
// vectorises where a cloned caller inlines it.
inline bool zero_if_nonfinite(double* row, int64_t dim) {
  int bad = 0;
  for (int64_t j = 0; j < dim; ++j) bad |= !(std::fabs(row[j]) <= std::numeric_limits<double>::max());
  if (bad) std::fill(row, row + dim, 0.0);
  return !bad;
}

}  // namespace tokencarve
