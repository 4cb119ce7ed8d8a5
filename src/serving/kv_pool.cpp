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
  free_ = num_pages;
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
  // First fit of a run of n consecutive free pages (a request's KV then lands in one run of
  // memory per layer and is received without staging); else the lowest free pages.
  std::vector<int32_t> pages;
  pages.reserve(static_cast<size_t>(n));
  int64_t run = 0;
  for (int64_t p = 0; p < num_pages_ && n > 0; ++p) {
    run = refs_[static_cast<size_t>(p)] == 0 ? run + 1 : 0;
    if (run == n) {
      for (int64_t q = p - n + 1; q <= p; ++q) pages.push_back(static_cast<int32_t>(q));
      break;
    }
  }
  for (int64_t p = 0; p < num_pages_ && static_cast<int64_t>(pages.size()) < n; ++p)
    if (refs_[static_cast<size_t>(p)] == 0) pages.push_back(static_cast<int32_t>(p));
  for (int32_t p : pages) refs_[static_cast<size_t>(p)] = 1;
  free_ -= n;
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
    if (--refs_[static_cast<size_t>(p)] == 0) ++free_;
  }
}

int KvPool::refcount(int32_t page) const {
  DISTATTN_CHECK(page >= 0 && page < num_pages_, "KvPool::refcount: page ", page,
                 " is not a page of this pool");
  return refs_[static_cast<size_t>(page)];
}

}  // namespace distattn::serving
