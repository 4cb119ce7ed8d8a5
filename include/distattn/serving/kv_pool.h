#pragma once
// KvPool: the paged KV cache of one rank (decode ranks; colocated ranks). A page holds
// `page_size` consecutive tokens of one request for EVERY layer: page id p is slot p of each
// layer's tensor (as vLLM's block ids), so one page table serves all layers.
//
//   GQA: k(l) [num_pages, page_size, units, D]   v(l) [num_pages, page_size, units, Dv]
//   MLA: k(l) [num_pages, page_size, units + rope]  (rows [latent slice | k_pe]; v(l) empty)
// where `units` are the KV heads or latent columns this rank stores (serving/sharding.h).
//
// Pages are reference counted: allocate() hands out pages with count 1, retain() adds an
// owner (e.g. a transfer still writing into them), release() drops one; a page returns to the
// free list when its count reaches 0. used_pages() is what `kv_pages_leaked` reports at the
// end of a run (it must be 0).
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "distattn/core/tensor_view.h"
#include "distattn/serving/sharding.h"

namespace distattn::serving {

class KvPool {
 public:
  KvPool(const KvGeometry& geometry, int64_t units, int64_t num_pages,
         Device device = Device::cpu());
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  const KvGeometry& geometry() const { return geometry_; }
  int64_t units() const { return units_; }
  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return geometry_.page_size; }
  int64_t free_pages() const { return free_; }
  int64_t used_pages() const { return num_pages_ - free_pages(); }
  int64_t high_water_pages() const { return high_water_; }
  int64_t bytes() const;  // memory of all layers' pages

  const TensorView& k(int64_t layer) const { return k_[static_cast<size_t>(layer)].view(); }
  const TensorView& v(int64_t layer) const { return v_[static_cast<size_t>(layer)].view(); }

  // n pages with count 1, or nullopt (nothing taken) when fewer than n are free. A run of n
  // consecutive pages when there is one (first fit), else the lowest free pages.
  std::optional<std::vector<int32_t>> allocate(int64_t n);
  void retain(std::span<const int32_t> pages);
  // Throws (kInternal) on a page that is not in use: a double free is a bug, never ignored.
  void release(std::span<const int32_t> pages);
  int refcount(int32_t page) const;

 private:
  void check_page(int32_t page, const char* op) const;
  KvGeometry geometry_;
  int64_t units_ = 0, num_pages_ = 0, high_water_ = 0;
  std::vector<Tensor> k_, v_;
  int64_t free_ = 0;
  std::vector<int> refs_;
};

}  // namespace distattn::serving
