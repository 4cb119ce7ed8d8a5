#pragma once
// Dimension coalescing shared by the elementwise ops' CPU bodies (src/ops/elementwise.cpp) and
// the CUDA kernels' host-side indexing (kernels/cuda/elementwise_index.h): one rule for which
// dims merge, so both devices walk a view the same way. Plain C++, no CUDA headers.
#include <cstdint>

#include "distattn/core/tensor_view.h"

namespace distattn::ops {

// Up to two tensors a and b of one shape: dims of size 1 dropped, neighbours merged where both
// tensors are contiguous across them (b = a for one tensor). Strides in elements. nd = 0 when
// no dim is left (a 0-d tensor or every size 1: a single element); a dim of size 0 is kept.
struct CoalescedDims {
  int nd = 0;
  int64_t numel = 1;  // elements of a (= of b)
  int64_t shape[kMaxDims] = {};
  int64_t sa[kMaxDims] = {};  // strides of tensor a (dst)
  int64_t sb[kMaxDims] = {};  // strides of tensor b (src)
};

inline CoalescedDims coalesce_dims(const TensorView& a, const TensorView& b) {
  CoalescedDims l;
  for (int d = 0; d < a.ndim; ++d) {
    l.numel *= a.shape[d];
    if (a.shape[d] == 1) continue;
    if (l.nd > 0) {
      const int p = l.nd - 1;
      if (l.sa[p] == a.shape[d] * a.strides[d] && l.sb[p] == a.shape[d] * b.strides[d]) {
        l.shape[p] *= a.shape[d];
        l.sa[p] = a.strides[d];
        l.sb[p] = b.strides[d];
        continue;
      }
    }
    l.shape[l.nd] = a.shape[d];
    l.sa[l.nd] = a.strides[d];
    l.sb[l.nd] = b.strides[d];
    ++l.nd;
  }
  return l;
}

}  // namespace distattn::ops
