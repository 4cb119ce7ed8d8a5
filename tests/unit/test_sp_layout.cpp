// Sequence-parallel layouts without communication: strategy names, token positions (for RoPE),
// head splits, shard/unshard round trips, error messages that name the needed multiple, and
// the per-rank FLOP model used for balance checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/parallel/sequence_parallel.h"

namespace distattn::parallel {
namespace {

std::vector<int64_t> iota(int64_t begin, int64_t end) {
  std::vector<int64_t> v(static_cast<size_t>(end - begin));
  std::iota(v.begin(), v.end(), begin);
  return v;
}

std::vector<int64_t> cat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST(SpLayout, StrategyNamesRoundTripAndUnknownNamesListTheChoices) {
  for (Strategy s : all_strategies()) EXPECT_EQ(parse_strategy(strategy_name(s)), s);
  EXPECT_EQ(all_strategies().size(), 6u);
  try {
    parse_strategy("stripe");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("zigzag"), std::string::npos) << e.what();
  }
}

TEST(SpLayout, ZigzagPositionsAreChunksRAndTwoPMinusOneMinusR) {
  EXPECT_EQ(token_positions(Strategy::kZigzag, 8, 2, 0), cat(iota(0, 2), iota(6, 8)));
  EXPECT_EQ(token_positions(Strategy::kZigzag, 8, 2, 1), iota(2, 6));
  EXPECT_EQ(token_positions(Strategy::kZigzag, 16, 4, 1), cat(iota(2, 4), iota(12, 14)));
  EXPECT_EQ(token_positions(Strategy::kAllGather, 16, 4, 3), iota(6, 10));
  EXPECT_EQ(token_positions(Strategy::kRing, 12, 3, 1), iota(4, 8));
  EXPECT_EQ(token_positions(Strategy::kUlysses, 12, 3, 2), iota(8, 12));
  EXPECT_EQ(token_positions(Strategy::kHeads, 5, 3, 2), iota(0, 5));
}

TEST(SpLayout, HybridPositionsAreUlyssesSubChunksOfTheRingRanksZigzagChunks) {
  const SpLayout l{Strategy::kHybrid, 4, 2};  // ring 2 x ulysses 2
  EXPECT_EQ(token_positions(l, 16, 0), cat(iota(0, 2), iota(12, 14)));
  EXPECT_EQ(token_positions(l, 16, 1), cat(iota(2, 4), iota(14, 16)));
  EXPECT_EQ(token_positions(l, 16, 2), cat(iota(4, 6), iota(8, 10)));
  EXPECT_EQ(token_positions(l, 16, 3), cat(iota(6, 8), iota(10, 12)));
}

TEST(SpLayout, EveryLayoutCoversEveryTokenExactlyOnce) {
  for (Strategy s : all_strategies()) {
    if (s == Strategy::kHeads) continue;
    for (int p = 1; p <= 8; ++p) {
      const int u = s == Strategy::kHybrid && p % 2 == 0 ? 2 : 1;
      const SpLayout l{s, p, u};
      const int64_t seq = 2 * p * 3;
      std::vector<int64_t> all;
      for (int r = 0; r < p; ++r) {
        const auto pos = token_positions(l, seq, r);
        EXPECT_EQ(static_cast<int64_t>(pos.size()), local_seq_len(l, seq));
        all.insert(all.end(), pos.begin(), pos.end());
      }
      std::sort(all.begin(), all.end());
      EXPECT_EQ(all, iota(0, seq)) << strategy_name(s) << " P=" << p;
    }
  }
}

TEST(SpLayout, IndivisibleSequencesNameTheNeededMultipleAndThePaddedLength) {
  SpShape sh{1, 100, 8, 2, 64, 0};
  try {
    check_layout(SpLayout{Strategy::kZigzag, 4, 1}, sh);
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("multiple of 8"), std::string::npos) << m;
    EXPECT_NE(m.find("pad it at the END to 104"), std::string::npos) << m;
    EXPECT_NE(m.find("discard the padded query rows"), std::string::npos) << m;
    // No key-mask option exists: the message must not promise one.
    EXPECT_EQ(m.find("masked by the caller"), std::string::npos) << m;
    EXPECT_NE(m.find("Non-causal attention has no key-length option"), std::string::npos) << m;
  }
  sh.seq = 10;
  EXPECT_THROW(check_layout(SpLayout{Strategy::kRing, 4, 1}, sh), Error);
  EXPECT_NO_THROW(check_layout(SpLayout{Strategy::kRing, 5, 1}, sh));
  sh.seq = 16;
  EXPECT_THROW(check_layout(SpLayout{Strategy::kHybrid, 4, 3}, sh), Error);  // 3 !| 4
  sh.heads_q = 2;
  sh.heads_kv = 2;
  EXPECT_THROW(check_layout(SpLayout{Strategy::kUlysses, 4, 1}, sh), Error);  // < 1 head/rank
  EXPECT_THROW(check_layout(SpLayout{Strategy::kHeads, 4, 1}, sh), Error);
  sh.heads_q = 8;
  sh.heads_kv = 3;
  EXPECT_THROW(check_layout(SpLayout{Strategy::kRing, 4, 1}, sh), Error);  // 8 % 3
}

TEST(SpLayout, HeadSplitsAreBalancedAndKvHeadsFollowTheirQueryHeads) {
  EXPECT_EQ(split_heads(8, 3, 0).begin, 0);
  EXPECT_EQ(split_heads(8, 3, 0).end, 3);
  EXPECT_EQ(split_heads(8, 3, 1).end, 6);
  EXPECT_EQ(split_heads(8, 3, 2).size(), 2);
  const SpShape sh{1, 8, 8, 2, 64, 0};
  const SpLayout l{Strategy::kHeads, 4, 1};
  // Hkv = 2 < P = 4: KV head 0 is replicated on ranks 0, 1; head 1 on ranks 2, 3.
  EXPECT_EQ(local_kv_heads(l, sh, 0).begin, 0);
  EXPECT_EQ(local_kv_heads(l, sh, 1).begin, 0);
  EXPECT_EQ(local_kv_heads(l, sh, 1).size(), 1);
  EXPECT_EQ(local_kv_heads(l, sh, 2).begin, 1);
  // Uneven: 8 query heads over 3 ranks (3, 3, 2): rank 1 holds heads 3..5 -> KV heads 0 and 1.
  const SpLayout l3{Strategy::kHeads, 3, 1};
  EXPECT_EQ(local_kv_heads(l3, sh, 1).begin, 0);
  EXPECT_EQ(local_kv_heads(l3, sh, 1).end, 2);
  EXPECT_EQ(local_query_heads(SpLayout{Strategy::kZigzag, 3, 1}, sh, 1).size(), 8);
}

TEST(SpLayout, ShardThenUnshardOfEveryRankRebuildsTheFullTensor) {
  const SpShape sh{2, 24, 6, 2, 8, 0};
  Tensor q = Tensor::empty({2, 24, 6, 8}, DType::kFloat32);
  Tensor k = Tensor::empty({2, 24, 2, 8}, DType::kFloat32);
  Tensor lse = Tensor::empty({2, 6, 24}, DType::kFloat32);
  testing::fill_test_data(q.view(), 1, 1);
  testing::fill_test_data(k.view(), 1, 2);
  testing::fill_test_data(lse.view(), 1, 3);
  for (Strategy s : all_strategies()) {
    for (int p : {1, 2, 3}) {
      const SpLayout l{s, p, s == Strategy::kHybrid && p == 2 ? 2 : 1};
      struct Item {
        ShardRole role;
        const Tensor* full;
      };
      for (const Item& it : {Item{ShardRole::kQuery, &q}, Item{ShardRole::kKeyValue, &k},
                             Item{ShardRole::kLse, &lse}}) {
        const TensorView f = it.full->view();
        Tensor rebuilt =
            Tensor::zeros(std::span<const int64_t>(f.shape.data(), f.ndim), DType::kFloat32);
        for (int r = 0; r < p; ++r) {
          Tensor local = shard(l, sh, r, it.role, f);
          const int sd = it.role == ShardRole::kLse ? 2 : 1;
          EXPECT_EQ(local.view().size(sd), local_seq_len(l, sh.seq));
          unshard_into(l, sh, r, it.role, local.view(), rebuilt.view());
        }
        const auto st = testing::compare(testing::to_double_vector(rebuilt.view()),
                                         testing::to_double_vector(f));
        EXPECT_EQ(st.max_abs_err, 0.0) << strategy_name(s) << " P=" << p;
      }
    }
  }
}

TEST(SpLayout, UnshardRejectsAShardOfTheWrongShape) {
  const SpShape sh{1, 8, 2, 2, 4, 0};
  Tensor full = Tensor::zeros({1, 8, 2, 4}, DType::kFloat32);
  Tensor wrong = Tensor::zeros({1, 3, 2, 4}, DType::kFloat32);
  EXPECT_THROW(unshard_into(SpLayout{Strategy::kRing, 2, 1}, sh, 0, ShardRole::kQuery, wrong.view(),
                            full.view()),
               Error);
  EXPECT_THROW(shard(SpLayout{Strategy::kRing, 2, 1}, sh, 2, ShardRole::kQuery, full.view()),
               Error);  // rank out of range
}

TEST(SpLayout, ZigzagCausalFlopsAreEqualOnEveryRankAndRingsAreNot) {
  const SpShape sh{1, 64, 4, 4, 64, 0};
  const SpLayout z{Strategy::kZigzag, 4, 1}, r{Strategy::kRing, 4, 1};
  double total = 0;
  for (int i = 0; i < 4; ++i) {
    EXPECT_DOUBLE_EQ(rank_forward_flops(z, sh, i, true), rank_forward_flops(z, sh, 0, true));
    total += rank_forward_flops(z, sh, i, true);
  }
  // Visible pairs of the whole causal problem: S(S+1)/2 per head.
  EXPECT_DOUBLE_EQ(total, 4.0 * 4 * 64 * (64.0 * 65 / 2));
  EXPECT_LT(rank_forward_flops(r, sh, 0, true), rank_forward_flops(r, sh, 3, true) / 5);
}

}  // namespace
}  // namespace distattn::parallel
