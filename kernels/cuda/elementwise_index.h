#pragma once
// Strided indexing of the CUDA elementwise kernels (kernels/cuda/elementwise.cu): shapes
// coalesced on the host, linear indices unravelled on the device. Plain C++ (no CUDA headers)
// so that the CPU unit tests check it on machines without a GPU.
#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "distattn/core/tensor_view.h"
#include "src/ops/elementwise_layout.h"

#if defined(__CUDACC__)
#define DISTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#define DISTATTN_UNROLL _Pragma("unroll")
#else
#define DISTATTN_HOST_DEVICE inline
#define DISTATTN_UNROLL
#endif

namespace distattn::kernels::cuda::elementwise {

DISTATTN_HOST_DEVICE uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The coalesced shape of one or two tensors (src/ops/elementwise_layout.h, b = a for one), with
// nd >= 1 (a single element is one dim of size 1) and the dividers of its dims.
struct Layout : ::distattn::ops::CoalescedDims {
  // 32-bit index path (numel < 2^31): i / shape[d] == (umulhi(i, magic[d]) + i) >> shift[d].
  uint32_t magic[kMaxDims];
  uint32_t shift[kMaxDims];
};

// Division by a runtime constant as multiply-high, add, shift (Granlund & Montgomery): with
// shift = ceil(log2(d)) and magic = floor(2^32 (2^shift - d) / d) + 1 (< 2^32), the quotient
// is exact for numerators and divisors below 2^31 (checked on the host for 5.5e9 pairs,
// exhaustively near powers of two and the bounds).
inline void set_divider(Layout& l, int d) {
  const uint64_t div = static_cast<uint64_t>(l.shape[d]);
  uint32_t s = 0;
  while ((uint64_t{1} << s) < div) ++s;
  l.shift[d] = s;
  l.magic[d] = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - div)) / div + 1);
}

inline Layout coalesce(const TensorView& a, const TensorView& b) {
  Layout l{::distattn::ops::coalesce_dims(a, b)};
  if (l.nd == 0) {  // a single element
    l.nd = 1;
    l.shape[0] = 1;
    l.sa[0] = 1;
    l.sb[0] = 1;
  }
  if (l.numel <= INT32_MAX)
    for (int d = 0; d < l.nd; ++d) set_divider(l, d);
  return l;
}

inline bool is_packed(const Layout& l) {
  return l.nd == 1 && l.sa[0] == 1 && l.sb[0] == 1;
}

// Two dims, contiguous rows, pitches the 2-D copy/memset engines accept (>= the row width,
// below the devices' 2^31-byte pitch limit). min_width: narrower rows go to the kernel, which
// handles many short rows better than per-row 2-D transfers.
inline bool is_pitched(const Layout& l, size_t ea, size_t eb, int64_t min_width = 0) {
  if (l.nd != 2 || l.sa[1] != 1 || l.sb[1] != 1) return false;
  if (l.shape[1] * static_cast<int64_t>(ea) < min_width) return false;
  const int64_t wa = l.shape[1] * static_cast<int64_t>(ea);
  const int64_t wb = l.shape[1] * static_cast<int64_t>(eb);
  const int64_t pa = l.sa[0] * static_cast<int64_t>(ea);
  const int64_t pb = l.sb[0] * static_cast<int64_t>(eb);
  return pa >= wa && pb >= wb && pa <= INT_MAX && pb <= INT_MAX;
}

template <typename Idx>
DISTATTN_HOST_DEVICE void unravel(const Layout& l, Idx i, int64_t& oa, int64_t& ob) {
  oa = 0;
  ob = 0;
  DISTATTN_UNROLL
  for (int d = kMaxDims - 1; d > 0; --d) {
    if (d < l.nd) {
      const Idx n = static_cast<Idx>(l.shape[d]);
      Idx q;
      if constexpr (std::is_same_v<Idx, uint32_t>) {
        q = (umulhi32(i, l.magic[d]) + i) >> l.shift[d];
      } else {
        q = i / n;
      }
      const int64_t r = static_cast<int64_t>(i - q * n);
      oa += r * l.sa[d];
      ob += r * l.sb[d];
      i = q;
    }
  }
  oa += static_cast<int64_t>(i) * l.sa[0];
  ob += static_cast<int64_t>(i) * l.sb[0];
}

}  // namespace distattn::kernels::cuda::elementwise
