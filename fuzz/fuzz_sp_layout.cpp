// libFuzzer harness: sequence-parallel layout validation and the shard maps
// (parallel::check_layout, shard, unshard_into, token_positions) for every strategy, rank
// count 1..8, Ulysses degree, and global shape (sequence, heads, KV heads, dims; including 0,
// negative and non-divisible values). check_layout must throw distattn::Error or accept; for
// an accepted layout, shard()/unshard_into() over every rank must rebuild each full tensor
// exactly (queries and lse once; KV heads the number of times head parallel replicates them),
// and token_positions() must list every global position exactly once over the ranks.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "distattn/core/error.h"
#include "distattn/core/tensor_view.h"
#include "distattn/parallel/sequence_parallel.h"

namespace {

using namespace distattn;
using namespace distattn::parallel;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_sp_layout: %s\n", what.c_str());
  std::abort();
}

// full[i] = i + 1, sharded by every rank and summed back.
void check_roundtrip(const SpLayout& layout, const SpShape& sh, ShardRole role) {
  const int64_t h = role == ShardRole::kKeyValue ? sh.heads_kv : sh.heads_q;
  const int64_t d = role == ShardRole::kKeyValue ? sh.head_dim : sh.head_dim;
  Tensor full = role == ShardRole::kLse
                    ? Tensor::empty({sh.batch, sh.heads_q, sh.seq}, DType::kFloat64)
                    : Tensor::empty({sh.batch, sh.seq, h, d}, DType::kFloat64);
  double* f = full.data_as<double>();
  for (int64_t i = 0; i < full.numel(); ++i) f[i] = static_cast<double>(i + 1);
  Tensor sum = Tensor::zeros(std::span<const int64_t>(full.view().shape.data(), full.view().ndim),
                             DType::kFloat64);
  for (int r = 0; r < layout.ranks; ++r) {
    Tensor local = shard(layout, sh, r, role, full.view());
    unshard_into(layout, sh, r, role, local.view(), sum.view(), /*accumulate=*/true);
  }
  const double* s = sum.data_as<double>();
  // Head parallel replicates KV heads when there are fewer than ranks: each is then summed
  // once per replica, a whole multiple of the value.
  for (int64_t i = 0; i < full.numel(); ++i) {
    const double m = s[i] / f[i];
    const bool exact = m == 1.0;
    const bool replicated = layout.strategy == Strategy::kHeads && role == ShardRole::kKeyValue &&
                            m >= 1.0 && m == static_cast<int64_t>(m);
    if (!exact && !replicated)
      fail(std::string("shard/unshard_into of ") + strategy_name(layout.strategy) + " over " +
           std::to_string(layout.ranks) + " ranks does not rebuild element " + std::to_string(i) +
           " (covered " + std::to_string(m) + " times)");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  SpLayout layout;
  layout.strategy =
      fdp.PickValueInArray({Strategy::kHeads, Strategy::kRing, Strategy::kZigzag,
                            Strategy::kUlysses, Strategy::kAllGather, Strategy::kHybrid});
  layout.ranks = fdp.ConsumeIntegralInRange<int>(fdp.ConsumeBool() ? -2 : 1, 8);
  layout.ulysses = fdp.ConsumeIntegralInRange<int>(fdp.ConsumeBool() ? -1 : 1, 8);
  SpShape sh;
  const auto small = [&](int64_t lo, int64_t hi) {
    return fdp.ConsumeIntegralInRange<int64_t>(lo, hi);
  };
  sh.batch = small(fdp.ConsumeBool() ? -1 : 1, 2);
  sh.seq = fdp.ConsumeBool() ? small(-2, 64) : small(0, 4) * 16;
  sh.heads_q = small(fdp.ConsumeBool() ? -1 : 1, 8);
  sh.heads_kv = small(fdp.ConsumeBool() ? -1 : 1, 8);
  sh.head_dim = small(fdp.ConsumeBool() ? -1 : 1, 4);
  sh.head_dim_v = small(-1, 4);
  try {
    check_layout(layout, sh);
  } catch (const Error& e) {
    if (e.message().empty()) fail("check_layout threw without a message");
    return 0;
  }
  if (layout.ranks < 1 || sh.seq < 0 || sh.heads_q < 1 || sh.heads_kv < 1 || sh.head_dim < 1 ||
      sh.batch < 0)
    fail("check_layout accepted a non-positive rank count or extent");
  std::vector<int> seen(static_cast<size_t>(sh.seq), 0);
  for (int r = 0; r < layout.ranks; ++r) {
    for (int64_t p : token_positions(layout, sh.seq, r)) {
      if (p < 0 || p >= sh.seq) fail("token_positions outside [0, seq)");
      ++seen[static_cast<size_t>(p)];
    }
  }
  // Head parallel: every rank holds the whole sequence (for its heads).
  const int want = layout.strategy == Strategy::kHeads ? layout.ranks
                   : layout.strategy == Strategy::kHybrid || layout.strategy == Strategy::kUlysses
                       ? -1
                       : 1;
  for (int64_t p = 0; p < sh.seq && want > 0; ++p)
    if (seen[static_cast<size_t>(p)] != want)
      fail("token_positions covers position " + std::to_string(p) + " " +
           std::to_string(seen[static_cast<size_t>(p)]) + " times");
  check_roundtrip(layout, sh, ShardRole::kQuery);
  check_roundtrip(layout, sh, ShardRole::kKeyValue);
  check_roundtrip(layout, sh, ShardRole::kLse);
  return 0;
}
