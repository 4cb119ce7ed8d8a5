// attention_forward (the CPU flash kernel behind the ops dispatch) against the fp64
// reference: every storage dtype x mask configuration x odd sizes, plus head dims 64, 128
// and MLA's 576/512, strided views and fully masked rows.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "tests/unit/attention_test_util.h"

namespace distattn::testing {
namespace {

struct MaskConfig {
  const char* name;
  bool causal;
  int64_t hq, hkv;
  int64_t window_left, window_right;
  // Offsets as functions of (Sq, Sk): queries at the end, or a "later key block" (ring).
  enum class Offsets { kZero, kQueriesAtEnd, kKeysAfter } offsets;
  float scale;  // 0: default 1/sqrt(D)
};

const MaskConfig kConfigs[] = {
    {"full", false, 4, 4, -1, -1, MaskConfig::Offsets::kZero, 0},
    {"causal", true, 4, 4, -1, -1, MaskConfig::Offsets::kQueriesAtEnd, 0},
    {"causal_keys_after", true, 2, 2, -1, -1, MaskConfig::Offsets::kKeysAfter, 0},
    {"window", false, 2, 2, 16, 5, MaskConfig::Offsets::kQueriesAtEnd, 0},
    {"causal_window", true, 2, 2, 9, -1, MaskConfig::Offsets::kQueriesAtEnd, 0},
    {"gqa", true, 6, 2, -1, -1, MaskConfig::Offsets::kQueriesAtEnd, 0},
    {"mqa_sharp", false, 4, 1, -1, -1, MaskConfig::Offsets::kZero, 1.0f},
};

ops::AttentionOptions options_for(const MaskConfig& c, int64_t sq, int64_t sk) {
  ops::AttentionOptions o;
  o.causal = c.causal;
  o.window_left = c.window_left;
  o.window_right = c.window_right;
  if (c.scale != 0) o.softmax_scale = c.scale;
  switch (c.offsets) {
    case MaskConfig::Offsets::kZero:
      break;
    case MaskConfig::Offsets::kQueriesAtEnd:
      o.q_offset = sk - sq;
      break;
    case MaskConfig::Offsets::kKeysAfter:  // the first queries see no key at all
      o.q_offset = 100;
      o.k_offset = 100 + sq / 2;
      break;
  }
  return o;
}

const std::pair<int64_t, int64_t> kSizes[] = {{1, 1},   {7, 7},   {131, 131}, {257, 257},
                                              {1, 257}, {7, 131}, {131, 7}};

using Param = std::tuple<DType, int, int>;  // dtype, config index, size index

class AttentionForwardSweep : public ::testing::TestWithParam<Param> {};

TEST_P(AttentionForwardSweep, MatchesReference) {
  const auto [dtype, ci, si] = GetParam();
  const MaskConfig& c = kConfigs[ci];
  const auto [sq, sk] = kSizes[si];
  const int64_t B = 2, D = 64, Dv = 64;
  const uint64_t seed = 100 + static_cast<uint64_t>(ci * 10 + si);
  Tensor q = make_input({B, sq, c.hq, D}, dtype, seed, 0);
  Tensor k = make_input({B, sk, c.hkv, D}, dtype, seed, 1);
  Tensor v = make_input({B, sk, c.hkv, Dv}, dtype, seed, 2);
  Tensor out = Tensor::empty({B, sq, c.hq, Dv}, dtype);
  Tensor lse = Tensor::empty({B, c.hq, sq}, DType::kFloat32);
  const ops::AttentionOptions o = options_for(c, sq, sk);
  ops::attention_forward(q, k, v, out, lse, o);
  auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
  expect_close(out, ref.out, tolerance(dtype), "out");
  expect_close(lse, ref.lse, 1e-5, "lse");  // lse is fp32 whatever the storage dtype
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const auto [dtype, ci, si] = info.param;
  return std::string(dtype_name(dtype)) + "_" + kConfigs[ci].name + "_" +
         std::to_string(kSizes[si].first) + "x" + std::to_string(kSizes[si].second);
}

INSTANTIATE_TEST_SUITE_P(
    All, AttentionForwardSweep,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                       ::testing::Range(0, static_cast<int>(std::size(kConfigs))),
                       ::testing::Range(0, static_cast<int>(std::size(kSizes)))),
    param_name);

class AttentionForwardHeadDim
    : public ::testing::TestWithParam<std::tuple<DType, std::pair<int64_t, int64_t>>> {};

TEST_P(AttentionForwardHeadDim, MatchesReference) {
  const auto [dtype, dims] = GetParam();
  const auto [D, Dv] = dims;
  const int64_t B = 1, Sq = 33, Sk = 70, Hq = 4, Hkv = 2;
  Tensor q = make_input({B, Sq, Hq, D}, dtype, 7, 0);
  Tensor k = make_input({B, Sk, Hkv, D}, dtype, 7, 1);
  Tensor v = make_input({B, Sk, Hkv, Dv}, dtype, 7, 2);
  Tensor out = Tensor::empty({B, Sq, Hq, Dv}, DType::kFloat32);  // fp32 partial output
  Tensor lse = Tensor::empty({B, Hq, Sq}, DType::kFloat32);
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = Sk - Sq;
  ops::attention_forward(q, k, v, out, lse, o);
  auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
  expect_close(out, ref.out, tolerance(DType::kFloat32) * 2, "out");
  expect_close(lse, ref.lse, 1e-5, "lse");
}

INSTANTIATE_TEST_SUITE_P(Dims, AttentionForwardHeadDim,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kBFloat16),
                                            ::testing::Values(std::pair<int64_t, int64_t>{64, 64},
                                                              std::pair<int64_t, int64_t>{128, 128},
                                                              std::pair<int64_t, int64_t>{576, 512},
                                                              std::pair<int64_t, int64_t>{96,
                                                                                          40})));

TEST(AttentionForward, StridedViewsMatchPacked) {
  const DType dt = DType::kFloat32;
  const int64_t B = 2, Sq = 19, Sk = 23, Hq = 4, Hkv = 2, D = 32, Dv = 24;
  Tensor q = make_input({B, Sq, Hq, D}, dt, 8, 0);
  Tensor k = make_input({B, Sk, Hkv, D}, dt, 8, 1);
  Tensor v = make_input({B, Sk, Hkv, Dv}, dt, 8, 2);
  PaddedTensor qs = make_padded({B, Sq, Hq, D}, dt);
  PaddedTensor ks = make_padded({B, Sk, Hkv, D}, dt, 1, 2);
  PaddedTensor vs = make_padded({B, Sk, Hkv, Dv}, dt, 5, 1);
  PaddedTensor os = make_padded({B, Sq, Hq, Dv}, dt, 2, 3);
  copy_into(q, qs.view);
  copy_into(k, ks.view);
  copy_into(v, vs.view);
  // lse as a transposed view of a [B, Sq, Hq] buffer: strides (Sq*Hq, 1, Hq).
  Tensor lse_store = Tensor::empty({B, Sq, Hq}, DType::kFloat32);
  const int64_t lshape[3] = {B, Hq, Sq}, lstr[3] = {Sq * Hq, 1, Hq};
  TensorView lse(lse_store.data(), DType::kFloat32, Device::cpu(), lshape, lstr);
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = Sk - Sq;
  ops::attention_forward(qs.view, ks.view, vs.view, os.view, lse, o);
  auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
  expect_close(os.view, ref.out, tolerance(dt), "out");
  expect_close(lse, ref.lse, 1e-5, "lse");
  // The padding between rows is untouched.
  const float* raw = os.storage.data_as<float>();
  for (int64_t e = Dv; e < Dv + 2; ++e) EXPECT_EQ(raw[e], 0.0f);
}

TEST(AttentionForward, FullyMaskedRowsAreZeroWithMinusInfLse) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    const int64_t Sq = 9, Sk = 5, H = 2, D = 16;
    Tensor q = make_input({1, Sq, H, D}, dt, 9, 0);
    Tensor k = make_input({1, Sk, H, D}, dt, 9, 1);
    Tensor v = make_input({1, Sk, H, D}, dt, 9, 2);
    Tensor out = make_input({1, Sq, H, D}, dt, 9, 3);  // garbage that must be overwritten
    Tensor lse = Tensor::zeros({1, H, Sq}, DType::kFloat32);
    ops::AttentionOptions o;
    o.causal = true;
    o.k_offset = 4;  // rows 0..3 see nothing
    ops::attention_forward(q, k, v, out, lse, o);
    const std::vector<double> got = to_double_vector(out);
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const float l = lse.data_as<float>()[h * Sq + i];
        if (i < 4) {
          EXPECT_TRUE(std::isinf(l) && l < 0) << dtype_name(dt) << " row " << i;
          for (int64_t e = 0; e < D; ++e) EXPECT_EQ(got[(i * H + h) * D + e], 0.0);
        } else {
          EXPECT_TRUE(std::isfinite(l));
        }
      }
    for (double x : got) EXPECT_FALSE(std::isnan(x));
    // Sk == 0: everything is masked.
    Tensor k0 = Tensor::empty({1, 0, H, D}, dt), v0 = Tensor::empty({1, 0, H, D}, dt);
    ops::attention_forward(q, k0, v0, out, lse);
    for (double x : to_double_vector(out)) EXPECT_EQ(x, 0.0);
    for (int64_t i = 0; i < lse.numel(); ++i)
      EXPECT_EQ(lse.data_as<float>()[i], -std::numeric_limits<float>::infinity());
  }
}

TEST(AttentionForward, FlopCountIsExactVisiblePairs) {
  EXPECT_DOUBLE_EQ(ops::attention_forward_flops(2, 3, 5, 7, 8, false), 4.0 * 2 * 3 * 5 * 7 * 8);
  // causal Sq == Sk == 4: 1+2+3+4 = 10 visible pairs.
  EXPECT_DOUBLE_EQ(ops::attention_forward_flops(1, 1, 4, 4, 8, true), 4.0 * 10 * 8);
  // Decode: one query at the end sees every key.
  EXPECT_DOUBLE_EQ(ops::attention_forward_flops(1, 2, 1, 100, 64, true), 4.0 * 2 * 100 * 64);
  ops::AttentionOptions o;
  o.causal = true;
  o.k_offset = 2;  // query i sees keys 2..i: rows 0,1 none, row 2: 1, row 3: 2
  EXPECT_DOUBLE_EQ(ops::attention_forward_flops(1, 1, 4, 4, 8, 4, o), 2.0 * 3 * 12);
  o = {};
  o.window_left = 1;
  o.window_right = 0;  // each query sees itself and one before: 1 + 2 + 2
  EXPECT_DOUBLE_EQ(ops::attention_forward_flops(1, 1, 3, 3, 2, 2, o), 2.0 * 5 * 4);
}

}  // namespace
}  // namespace distattn::testing
