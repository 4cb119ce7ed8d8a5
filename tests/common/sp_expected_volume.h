#pragma once
// Bytes each sequence-/head-parallel strategy must send from one rank, written from the
// algorithm's definition, for the ledger checks of tests/mpi/test_sp_attention.cpp and
// tests/cuda/test_sp_cuda.cpp (one formula: staging device memory through the host must not
// change what the ledger counts).
#include <cstddef>
#include <cstdint>

#include "distattn/parallel/sequence_parallel.h"

namespace distattn::testing {

struct SpVolume {
  uint64_t fwd = 0, bwd = 0;  // bytes sent by the forward, by the backward
};

// Full tensors are q [b, seq, hq, d], k/v [b, seq, hkv, d]; `rank` is the layout rank
// (SpGroup::layout_rank). elt = bytes of the storage dtype; cross-rank partials and gradients
// travel as fp32 (4 bytes).
inline SpVolume sp_expected_volume(const parallel::SpLayout& layout, int rank, int64_t b,
                                   int64_t seq, int64_t hq, int64_t hkv, int64_t d, size_t elt) {
  using parallel::HeadRange;
  using parallel::split_heads;
  using parallel::Strategy;
  const int p = layout.ranks;
  const int64_t sl = seq / p;
  const uint64_t kv_block = static_cast<uint64_t>(2 * b * sl * hkv * d);  // K and V elements
  SpVolume v;
  auto ulysses = [&](int u, int me, int64_t tokens_per_rank) {
    SpVolume x;
    const int64_t g_ = hq / hkv;
    auto qh = [&](int j) { return split_heads(hq, u, j).size(); };
    auto kh = [&](int j) {
      const HeadRange h = split_heads(hq, u, j);
      return (h.end - 1) / g_ + 1 - h.begin / g_;
    };
    for (int j = 0; j < u; ++j) {
      if (j == me) continue;
      const uint64_t qkv = static_cast<uint64_t>(b * tokens_per_rank * (qh(j) + 2 * kh(j)) * d);
      const uint64_t back = static_cast<uint64_t>(b * tokens_per_rank * qh(me) * d);
      const uint64_t lse_back = static_cast<uint64_t>(b * tokens_per_rank * qh(me));
      x.fwd += qkv * elt + back * elt + lse_back * 4;
      // q,k,v + out + dout + lse forward; dq, dk, dv back in fp32.
      const uint64_t o = static_cast<uint64_t>(b * tokens_per_rank * qh(j) * d);
      const uint64_t l = static_cast<uint64_t>(b * tokens_per_rank * qh(j));
      const uint64_t grads = static_cast<uint64_t>(b * tokens_per_rank * (qh(me) + 2 * kh(me)) * d);
      x.bwd += qkv * elt + 2 * o * elt + l * 4 + grads * 4;
    }
    return x;
  };
  switch (layout.strategy) {
    case Strategy::kHeads:
      break;
    case Strategy::kRing:
    case Strategy::kZigzag:
      v.fwd = (p - 1) * kv_block * elt;
      v.bwd = p > 1 ? (p - 1) * kv_block * elt + p * kv_block * 4 : 0;
      break;
    case Strategy::kAllGather:
      v.fwd = (p - 1) * kv_block * elt;
      v.bwd = (p - 1) * kv_block * elt + (p - 1) * kv_block * 4;
      break;
    case Strategy::kUlysses:
      v = ulysses(p, rank, sl);
      break;
    case Strategy::kHybrid: {
      const int u = layout.ulysses, r = p / u;
      v = ulysses(u, rank % u, sl);
      // Ring over R ranks with this rank's heads and the ring rank's u*sl tokens.
      const HeadRange h = split_heads(hq, u, rank % u);
      const int64_t g_ = hq / hkv;
      const int64_t khe = (h.end - 1) / g_ + 1 - h.begin / g_;
      const uint64_t blk = static_cast<uint64_t>(2 * b * u * sl * khe * d);
      v.fwd += (r - 1) * blk * elt;
      v.bwd += r > 1 ? (r - 1) * blk * elt + r * blk * 4 : 0;
      break;
    }
  }
  return v;
}

}  // namespace distattn::testing
