// The fp64 reference is the oracle of every other attention test, so it is checked here
// against facts that do not depend on it: closed forms, finite differences, GQA as
// repeated KV heads, and mask semantics.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tests/unit/attention_test_util.h"

namespace distattn::testing {
namespace {

using kernels::cpu::reference_attention_backward;
using kernels::cpu::reference_attention_forward;

TEST(ReferenceAttention, SingleKeyGivesItsValueAndScoreAsLse) {
  Tensor q = make_input({1, 3, 2, 5}, DType::kFloat64, 1, 0);
  Tensor k = make_input({1, 1, 2, 5}, DType::kFloat64, 1, 1);
  Tensor v = make_input({1, 1, 2, 4}, DType::kFloat64, 1, 2);
  ops::AttentionOptions o;
  o.softmax_scale = 0.7f;
  auto r = reference_attention_forward(q, k, v, o);
  const double* Q = q.data_as<double>();
  const double* K = k.data_as<double>();
  const double* V = v.data_as<double>();
  for (int i = 0; i < 3; ++i)
    for (int h = 0; h < 2; ++h) {
      double s = 0;
      for (int e = 0; e < 5; ++e) s += Q[(i * 2 + h) * 5 + e] * K[h * 5 + e];
      EXPECT_NEAR(r.lse.data_as<double>()[h * 3 + i], 0.7f * s, 1e-12);
      for (int e = 0; e < 4; ++e)
        EXPECT_NEAR(r.out.data_as<double>()[(i * 2 + h) * 4 + e], V[h * 4 + e], 1e-12);
    }
}

TEST(ReferenceAttention, ConstantValuesGiveConstantOutputForMlaHeadDims) {
  // softmax weights sum to one: v == 1 everywhere gives out == 1 on every visible row.
  Tensor q = make_input({1, 4, 2, 576}, DType::kFloat32, 2, 0);
  Tensor k = make_input({1, 9, 1, 576}, DType::kFloat32, 2, 1);
  Tensor v = Tensor::empty({1, 9, 1, 512}, DType::kFloat32);
  for (int64_t i = 0; i < v.numel(); ++i) v.data_as<float>()[i] = 1.0f;
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = 5;
  auto r = reference_attention_forward(q, k, v, o);
  for (int64_t i = 0; i < r.out.numel(); ++i) ASSERT_NEAR(r.out.data_as<double>()[i], 1.0, 1e-12);
}

TEST(ReferenceAttention, GqaEqualsRepeatedKvHeads) {
  const int64_t Hq = 6, Hkv = 2, g = Hq / Hkv;
  Tensor q = make_input({2, 5, Hq, 8}, DType::kFloat64, 3, 0);
  Tensor k = make_input({2, 7, Hkv, 8}, DType::kFloat64, 3, 1);
  Tensor v = make_input({2, 7, Hkv, 6}, DType::kFloat64, 3, 2);
  Tensor dout = make_input({2, 5, Hq, 6}, DType::kFloat64, 3, 3);
  Tensor kr = Tensor::empty({2, 7, Hq, 8}, DType::kFloat64);
  Tensor vr = Tensor::empty({2, 7, Hq, 6}, DType::kFloat64);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t j = 0; j < 7; ++j)
      for (int64_t h = 0; h < Hq; ++h) {
        for (int e = 0; e < 8; ++e)
          kr.data_as<double>()[((b * 7 + j) * Hq + h) * 8 + e] =
              k.data_as<double>()[((b * 7 + j) * Hkv + h / g) * 8 + e];
        for (int e = 0; e < 6; ++e)
          vr.data_as<double>()[((b * 7 + j) * Hq + h) * 6 + e] =
              v.data_as<double>()[((b * 7 + j) * Hkv + h / g) * 6 + e];
      }
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = 2;
  auto a = reference_attention_forward(q, k, v, o);
  auto b = reference_attention_forward(q, kr, vr, o);
  expect_close(a.out, b.out, 1e-14, "out");
  expect_close(a.lse, b.lse, 1e-14, "lse");
  auto ga = reference_attention_backward(q, k, v, dout, o);
  auto gb = reference_attention_backward(q, kr, vr, dout, o);
  expect_close(ga.dq, gb.dq, 1e-13, "dq");
  // dk of the grouped call is the sum over the group's repeated heads.
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t j = 0; j < 7; ++j)
      for (int64_t hk = 0; hk < Hkv; ++hk)
        for (int e = 0; e < 8; ++e) {
          double sum = 0;
          for (int64_t r = 0; r < g; ++r)
            sum += gb.dk.data_as<double>()[((b * 7 + j) * Hq + hk * g + r) * 8 + e];
          ASSERT_NEAR(ga.dk.data_as<double>()[((b * 7 + j) * Hkv + hk) * 8 + e], sum, 1e-12);
        }
}

// L = sum(out * dout); its gradient by central differences must match the reference
// backward, under causal + offsets + window + GQA so every mask path is covered.
TEST(ReferenceAttention, BackwardMatchesFiniteDifferences) {
  Tensor q = make_input({1, 4, 2, 3}, DType::kFloat64, 4, 0, 2.0);
  Tensor k = make_input({1, 6, 1, 3}, DType::kFloat64, 4, 1, 2.0);
  Tensor v = make_input({1, 6, 1, 2}, DType::kFloat64, 4, 2);
  Tensor dout = make_input({1, 4, 2, 2}, DType::kFloat64, 4, 3);
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = 3;
  o.k_offset = 1;
  o.window_left = 3;
  auto loss = [&]() {
    auto r = reference_attention_forward(q, k, v, o);
    double l = 0;
    for (int64_t i = 0; i < r.out.numel(); ++i)
      l += r.out.data_as<double>()[i] * dout.data_as<double>()[i];
    return l;
  };
  auto g = reference_attention_backward(q, k, v, dout, o);
  const struct {
    const Tensor& x;
    const Tensor& grad;
    const char* name;
  } cases[] = {{q, g.dq, "dq"}, {k, g.dk, "dk"}, {v, g.dv, "dv"}};
  double max_grad = 0;
  for (const auto& c : cases) {
    for (int64_t i = 0; i < c.x.numel(); ++i) {
      double& x = c.x.data_as<double>()[i];
      const double saved = x, h = 1e-6;
      x = saved + h;
      const double lp = loss();
      x = saved - h;
      const double lm = loss();
      x = saved;
      const double fd = (lp - lm) / (2 * h);
      max_grad = std::max(max_grad, std::abs(fd));
      EXPECT_NEAR(c.grad.data_as<double>()[i], fd, 1e-7) << c.name << "[" << i << "]";
    }
  }
  EXPECT_GT(max_grad, 1e-2);  // the check is not vacuous
}

TEST(ReferenceAttention, FullyMaskedRowsGiveZeroOutMinusInfLseZeroGrads) {
  Tensor q = make_input({1, 5, 2, 4}, DType::kFloat32, 5, 0);
  Tensor k = make_input({1, 3, 2, 4}, DType::kFloat32, 5, 1);
  Tensor v = make_input({1, 3, 2, 4}, DType::kFloat32, 5, 2);
  Tensor dout = make_input({1, 5, 2, 4}, DType::kFloat32, 5, 3);
  ops::AttentionOptions o;
  o.causal = true;
  o.k_offset = 2;  // query i at i sees keys 2..4: rows 0, 1 see nothing
  auto r = reference_attention_forward(q, k, v, o);
  auto g = reference_attention_backward(q, k, v, dout, o);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 5; ++i) {
      const double lse = r.lse.data_as<double>()[h * 5 + i];
      if (i < 2) {
        EXPECT_TRUE(std::isinf(lse) && lse < 0) << "row " << i;
        for (int e = 0; e < 4; ++e) {
          EXPECT_EQ(r.out.data_as<double>()[(i * 2 + h) * 4 + e], 0.0);
          EXPECT_EQ(g.dq.data_as<double>()[(i * 2 + h) * 4 + e], 0.0);
        }
      } else {
        EXPECT_TRUE(std::isfinite(lse)) << "row " << i;
      }
    }
  // Key 2 (position 4) is seen only by row 4.
  for (int64_t i = 0; i < g.dk.numel(); ++i) EXPECT_FALSE(std::isnan(g.dk.data_as<double>()[i]));
}

TEST(ReferenceAttention, StridedAndLowPrecisionInputsReadLikePackedOnes) {
  Tensor q = make_input({2, 5, 3, 8}, DType::kBFloat16, 6, 0);
  Tensor k = make_input({2, 6, 3, 8}, DType::kBFloat16, 6, 1);
  Tensor v = make_input({2, 6, 3, 4}, DType::kBFloat16, 6, 2);
  PaddedTensor qs = make_padded({2, 5, 3, 8}, DType::kBFloat16);
  PaddedTensor ks = make_padded({2, 6, 3, 8}, DType::kBFloat16);
  PaddedTensor vs = make_padded({2, 6, 3, 4}, DType::kBFloat16);
  copy_into(q, qs.view);
  copy_into(k, ks.view);
  copy_into(v, vs.view);
  auto a = reference_attention_forward(q, k, v);
  auto b = reference_attention_forward(qs.view, ks.view, vs.view);
  expect_close(b.out, a.out, 0.0, "out");
  expect_close(b.lse, a.lse, 0.0, "lse");
}

TEST(ReferenceAttention, RejectsInconsistentShapes) {
  Tensor q = make_input({1, 2, 3, 4}, DType::kFloat32, 7, 0);
  Tensor k = make_input({1, 2, 2, 4}, DType::kFloat32, 7, 1);
  EXPECT_THROW(reference_attention_forward(q, k, k), Error);  // 3 % 2 != 0
}

}  // namespace
}  // namespace distattn::testing
