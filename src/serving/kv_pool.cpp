// The paged KV pool of a rank (distattn/serving/kv_pool.h).
#include "distattn/serving/kv_pool.h"

#include <algorithm>

#include "distattn/core/error.h"

namespace distattn::serving {

KvPool::KvPool(const KvGeometry& geometry, int64_t units, int64_t num_pages, Device device)
    : geometry_(geometry), units_(units), num_pages_(num_pages) {
  DISTATTN_CHECK(num_pages >= 1 && num_pages < (int64_t{1} << 31),
                 "KvPool: --kv-pages must be in [1, 2^31); got ", num_pages);
  DISTATTN_CHECK(units >= 1, "KvPool: a rank must store at least one KV unit; got ", units);
  DISTATTN_CHECK(geometry.page_size >= 1, "KvPool: --page-size must be >= 1; got ",
                 geometry.page_size);
  const int64_t ps = geometry.page_size;
  for (int64_t l = 0; l < geometry.layers; ++l) {
    if (geometry.family == ModelFamily::kGqa) {
      k_.push_back(
          Tensor::empty({num_pages, ps, units, geometry.head_dim}, geometry.dtype, device));
      v_.push_back(
          Tensor::empty({num_pages, ps, units, geometry.head_dim_v}, geometry.dtype, device));
    } else {
      k_.push_back(Tensor::empty({num_pages, ps, units + geometry.rope}, geometry.dtype, device));
      v_.emplace_back();
    }
  }
  free_.resize(static_cast<size_t>(num_pages));
  // Lowest ids first out (the free list is a stack).
  for (int64_t i = 0; i < num_pages; ++i)
    free_[static_cast<size_t>(i)] = static_cast<int32_t>(num_pages - 1 - i);
  refs_.assign(static_cast<size_t>(num_pages), 0);
}

int64_t KvPool::bytes() const {
  int64_t n = 0;
  for (const Tensor& t : k_) n += static_cast<int64_t>(t.nbytes());
  for (const Tensor& t : v_) n += static_cast<int64_t>(t.nbytes());
  return n;
}

std::optional<std::vector<int32_t>> KvPool::allocate(int64_t n) {
  DISTATTN_CHECK(n >= 0, "KvPool::allocate: page count must be >= 0; got ", n);
  if (n > free_pages()) return std::nullopt;
  std::vector<int32_t> pages(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    pages[static_cast<size_t>(i)] = free_.back();
    free_.pop_back();
    refs_[static_cast<size_t>(pages[static_cast<size_t>(i)])] = 1;
  }
  high_water_ = std::max(high_water_, used_pages());
  return pages;
}

void KvPool::check_page(int32_t page, const char* op) const {
  DISTATTN_CHECK_STATUS(page >= 0 && page < num_pages_, Status::kInternal, "KvPool::", op,
                        ": page ", page, " is not a page of this pool (", num_pages_, " pages)");
  DISTATTN_CHECK_STATUS(refs_[static_cast<size_t>(page)] > 0, Status::kInternal, "KvPool::", op,
                        ": page ", page, " is not in use (double free?)");
}

void KvPool::retain(std::span<const int32_t> pages) {
  for (int32_t p : pages) check_page(p, "retain");
  for (int32_t p : pages) ++refs_[static_cast<size_t>(p)];
}

void KvPool::release(std::span<const int32_t> pages) {
  // Checked one at a time, so a page listed twice cannot drive its count below zero.
  for (int32_t p : pages) {
    check_page(p, "release");
    if (--refs_[static_cast<size_t>(p)] == 0) free_.push_back(p);
  }
}

int KvPool::refcount(int32_t page) const {
  DISTATTN_CHECK(page >= 0 && page < num_pages_, "KvPool::refcount: page ", page,
                 " is not a page of this pool");
  return refs_[static_cast<size_t>(page)];
}

}  // namespace distattn::serving
