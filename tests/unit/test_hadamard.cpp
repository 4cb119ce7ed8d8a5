// Fast Walsh-Hadamard transform: equals the explicit Sylvester matrix product, is its own
// inverse up to the scale d, preserves norms at scale 1/sqrt(d), respects row strides.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <vector>

#include "common/test_data.h"
#include "distattn/core/error.h"
#include "distattn/ops/mla.h"

namespace distattn {
namespace {

std::vector<double> explicit_hadamard(const std::vector<double>& x, int64_t rows, int64_t d) {
  std::vector<double> y(x.size(), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < d; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < d; ++j) {
        const double sign = (std::popcount(static_cast<uint64_t>(i & j)) & 1) ? -1.0 : 1.0;
        acc += sign * x[r * d + j];
      }
      y[r * d + i] = acc;
    }
  return y;
}

TEST(Hadamard, MatchesExplicitMatrixProductForEveryPowerOfTwo) {
  for (int64_t d : {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}) {
    const int64_t rows = 5;
    Tensor x = Tensor::empty({rows, d}, DType::kFloat32);
    testing::fill_test_data(x, 11, static_cast<uint64_t>(d));
    const auto before = testing::to_double_vector(x);
    const auto ref = explicit_hadamard(before, rows, d);
    ops::hadamard_transform(x, 1.0f);
    const auto st = testing::compare(testing::to_double_vector(x), ref);
    EXPECT_EQ(st.non_finite, 0);
    EXPECT_LT(st.rel(), 1e-6) << "d=" << d;
  }
}

TEST(Hadamard, IsItsOwnInverseUpToScale) {
  const int64_t rows = 7, d = 512;
  Tensor x = Tensor::empty({rows, d}, DType::kFloat32);
  testing::fill_test_data(x, 3, 1);
  const auto orig = testing::to_double_vector(x);
  ops::hadamard_transform(x, 1.0f);
  ops::hadamard_transform(x, 1.0f);  // H H = d I
  std::vector<double> scaled(orig.size());
  for (size_t i = 0; i < orig.size(); ++i) scaled[i] = orig[i] * d;
  EXPECT_LT(testing::compare(testing::to_double_vector(x), scaled).rel(), 1e-6);

  // The orthonormal scale 1/sqrt(d) makes it an involution: H/sqrt(d) H/sqrt(d) = I.
  Tensor z = Tensor::empty({rows, d}, DType::kFloat32);
  testing::fill_test_data(z, 3, 1);
  const float s = 1.0f / std::sqrt(static_cast<float>(d));
  ops::hadamard_transform(z, s);
  EXPECT_GT(testing::compare(testing::to_double_vector(z), orig).rel(), 0.1);  // it moved
  ops::hadamard_transform(z, s);
  EXPECT_LT(testing::compare(testing::to_double_vector(z), orig).rel(), 1e-6);
}

TEST(Hadamard, OrthonormalScalePreservesRowNorms) {
  const int64_t rows = 4, d = 256;
  Tensor x = Tensor::empty({rows, d}, DType::kFloat32);
  testing::fill_test_data(x, 5, 2);
  const auto orig = testing::to_double_vector(x);
  ops::hadamard_transform(x, 1.0f / 16.0f);
  const auto got = testing::to_double_vector(x);
  for (int64_t r = 0; r < rows; ++r) {
    double n0 = 0, n1 = 0;
    for (int64_t i = 0; i < d; ++i) {
      n0 += orig[r * d + i] * orig[r * d + i];
      n1 += got[r * d + i] * got[r * d + i];
    }
    EXPECT_NEAR(n1 / n0, 1.0, 1e-6);
  }
}

TEST(Hadamard, TransformsOnlyTheViewOfAStridedTensor) {
  // A [3, 2, 64] view inside a [3, 4, 80] buffer: rows have stride 80, planes 320.
  Tensor buf = Tensor::empty({3, 4, 80}, DType::kFloat32);
  testing::fill_test_data(buf, 9, 3);
  const auto orig = testing::to_double_vector(buf);
  TensorView v = buf.view().slice(1, 1, 2).slice(2, 8, 64);
  ops::hadamard_transform(v, 1.0f);
  const auto got = testing::to_double_vector(buf);
  for (int64_t a = 0; a < 3; ++a)
    for (int64_t b = 0; b < 4; ++b) {
      std::vector<double> row(orig.begin() + (a * 4 + b) * 80 + 8,
                              orig.begin() + (a * 4 + b) * 80 + 72);
      const bool inside = b >= 1 && b < 3;
      const auto want = inside ? explicit_hadamard(row, 1, 64) : row;
      for (int64_t i = 0; i < 80; ++i) {
        const double g = got[(a * 4 + b) * 80 + i];
        const double w = (i >= 8 && i < 72) ? want[i - 8] : orig[(a * 4 + b) * 80 + i];
        ASSERT_NEAR(g, w, 1e-4) << a << "," << b << "," << i;
      }
    }
}

TEST(Hadamard, RejectsBadInputsWithActionableMessages) {
  Tensor x = Tensor::zeros({2, 48}, DType::kFloat32);
  EXPECT_THROW(ops::hadamard_transform(x, 1.0f), Error);
  Tensor h = Tensor::zeros({2, 64}, DType::kBFloat16);
  EXPECT_THROW(ops::hadamard_transform(h, 1.0f), Error);
  Tensor y = Tensor::zeros({64, 2}, DType::kFloat32);
  const int64_t shape[] = {2, 64};
  const int64_t strides[] = {1, 2};  // last dim strided
  TensorView t(y.data(), DType::kFloat32, Device::cpu(), shape, strides);
  EXPECT_THROW(ops::hadamard_transform(t, 1.0f), Error);
  try {
    ops::hadamard_transform(x, 1.0f);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("power of two"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace distattn
