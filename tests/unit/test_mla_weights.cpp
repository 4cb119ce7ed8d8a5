// MLA weights: per-head generation equals the slice of the full set (each rank can build
// its shard alone), .npy round trip with head slicing, clear errors for missing files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <string>

#include "distattn/core/error.h"
#include "distattn/parallel/mla.h"

namespace distattn {
namespace {

parallel::MlaConfig cfg() {
  parallel::MlaConfig c;
  c.hidden = 32;
  c.heads = 6;
  c.q_lora_rank = 16;
  c.kv_lora_rank = 32;
  c.qk_nope = 8;
  c.qk_rope = 8;
  c.v_head = 8;
  return c;
}

bool same(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && a.view().shape == b.view().shape &&
         std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

void expect_same(const parallel::MlaWeights& a, const parallel::MlaWeights& b) {
  EXPECT_EQ(a.head_begin, b.head_begin);
  EXPECT_EQ(a.head_count, b.head_count);
  EXPECT_TRUE(same(a.w_dq, b.w_dq));
  EXPECT_TRUE(same(a.w_uq, b.w_uq));
  EXPECT_TRUE(same(a.w_qr, b.w_qr));
  EXPECT_TRUE(same(a.w_dkv, b.w_dkv));
  EXPECT_TRUE(same(a.w_kr, b.w_kr));
  EXPECT_TRUE(same(a.gamma, b.gamma));
  EXPECT_TRUE(same(a.w_uk, b.w_uk));
  EXPECT_TRUE(same(a.w_uv, b.w_uv));
  EXPECT_TRUE(same(a.w_o, b.w_o));
}

TEST(MlaWeights, NpyRoundTripKeepsTheRequestedHeadsAndMatchesShardedGeneration) {
  const auto c = cfg();
  const auto full = parallel::MlaWeights::generate(c, 9);
  const std::string dir = std::filesystem::temp_directory_path().string() + "/distattn_mla_w_" +
                          std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  full.save_npy(c, dir);
  expect_same(parallel::MlaWeights::load_npy(c, dir), full);
  // Heads [2, 5): the file slice equals what a rank generates for those heads alone.
  const auto part = parallel::MlaWeights::load_npy(c, dir, 2, 3);
  expect_same(part, parallel::MlaWeights::generate(c, 9, 2, 3));
  EXPECT_FALSE(same(part.w_uk, parallel::MlaWeights::generate(c, 9, 1, 3).w_uk));
  // A config that disagrees with the files is refused, naming what is wrong.
  auto other = c;
  other.kv_lora_rank = 16;
  EXPECT_THROW(parallel::MlaWeights::load_npy(other, dir), Error);
  std::filesystem::remove(dir + "/w_o.npy");
  try {
    parallel::MlaWeights::load_npy(c, dir);
    ADD_FAILURE() << "missing w_o.npy accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("w_o.npy"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
  EXPECT_THROW(part.save_npy(c, dir), Error);  // not all heads
}

TEST(MlaWeights, ChecksTheHeadsARankNeeds) {
  const auto c = cfg();
  const auto part = parallel::MlaWeights::generate(c, 1, 0, 3);
  EXPECT_NO_THROW(part.check(c, 0, 3));
  EXPECT_THROW(part.check(c, 2, 3), Error);
  EXPECT_THROW(parallel::MlaWeights::generate(c, 1, 4, 3), Error);
}

}  // namespace
}  // namespace distattn
