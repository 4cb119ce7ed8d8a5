#pragma once
// Strided test layouts shared by the elementwise tests (CPU and CUDA): a view of `shape`
// inside a larger 1-D backing buffer, packed, transposed, sliced (padded by 2 per dim) or
// with its two leading dims permuted, never starting at the backing's first element.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace distattn::testing {

enum class Kind { kPacked, kTransposed, kSliced, kPermuted };
inline constexpr Kind kKinds[] = {Kind::kPacked, Kind::kTransposed, Kind::kSliced, Kind::kPermuted};

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kPacked:
      return "packed";
    case Kind::kTransposed:
      return "transposed";
    case Kind::kSliced:
      return "sliced";
    case Kind::kPermuted:
      return "permuted";
  }
  return "?";
}

struct StridedLayout {
  int64_t backing_numel = 0;  // elements of the 1-D backing
  int64_t base = 0;           // element offset of the view's first element in the backing
  std::vector<int64_t> strides;
};

inline StridedLayout strided_layout(const std::vector<int64_t>& shape, Kind kind) {
  const int nd = static_cast<int>(shape.size());
  std::vector<int> order(nd);  // order[i] = view dim stored at memory position i
  std::iota(order.begin(), order.end(), 0);
  if (kind == Kind::kTransposed) std::reverse(order.begin(), order.end());
  if (kind == Kind::kPermuted && nd >= 2) std::swap(order[0], order[1]);
  const int64_t pad = kind == Kind::kSliced ? 2 : 0;
  std::vector<int64_t> alloc(nd), mem_stride(nd, 1);
  for (int i = 0; i < nd; ++i) alloc[i] = shape[order[i]] + pad;
  for (int i = nd - 2; i >= 0; --i) mem_stride[i] = mem_stride[i + 1] * alloc[i + 1];
  StridedLayout l;
  l.strides.resize(nd);
  int64_t total = 1;
  l.base = 1;  // never at the start of the backing
  for (int i = 0; i < nd; ++i) {
    total *= alloc[i];
    l.strides[order[i]] = mem_stride[i];
    l.base += (pad / 2) * mem_stride[i];
  }
  l.backing_numel = total + 3;
  return l;
}

}  // namespace distattn::testing
