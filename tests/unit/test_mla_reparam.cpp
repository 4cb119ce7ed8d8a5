// TPLA offline reparameterization: Jacobi eigensolver, orthogonal U for every rotation,
// PCA ordering, the fast Hadamard rotation equal to its dense matrix, mu calibration (and
// regrouping one U), the sliced / exact RMSNorm of a latent slice.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "distattn/core/error.h"
#include "distattn/parallel/mla.h"

namespace distattn {
namespace {

using parallel::TplaRotation;

double u01(uint64_t i) {
  return std::fmod(std::sin(static_cast<double>(i) * 12.9898) * 43758.5453, 1.0);
}

TEST(MlaReparam, JacobiEigenDecomposesASymmetricMatrix) {
  const int64_t n = 24;
  std::vector<double> a(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j)
      a[i * n + j] = a[j * n + i] = u01(static_cast<uint64_t>(i * n + j + 1));
  const std::vector<double> orig = a;
  std::vector<double> v;
  const auto vals = parallel::symmetric_eigen(a, n, v);
  for (int64_t k = 0; k + 1 < n; ++k) EXPECT_GE(vals[k], vals[k + 1]);
  double max_res = 0, max_orth = 0;
  for (int64_t k = 0; k < n; ++k)
    for (int64_t i = 0; i < n; ++i) {
      double av = 0;
      for (int64_t j = 0; j < n; ++j) av += orig[i * n + j] * v[j * n + k];
      max_res = std::max(max_res, std::abs(av - vals[k] * v[i * n + k]));
    }
  for (int64_t k = 0; k < n; ++k)
    for (int64_t l = 0; l < n; ++l) {
      double d = 0;
      for (int64_t i = 0; i < n; ++i) d += v[i * n + k] * v[i * n + l];
      max_orth = std::max(max_orth, std::abs(d - (k == l ? 1.0 : 0.0)));
    }
  EXPECT_LT(max_res, 1e-10);
  EXPECT_LT(max_orth, 1e-10);
}

std::vector<float> anisotropic_latents(int64_t n, int64_t d) {
  // Variance decays along a non-axis direction mix: c_j = sum_k s_k z_k R[k][j].
  std::vector<float> c(n * d, 0.0f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t k = 0; k < d; ++k) {
      const double z = u01(static_cast<uint64_t>(t * d + k + 7)) * std::exp(-0.3 * k);
      for (int64_t j = 0; j < d; ++j)
        c[t * d + j] += static_cast<float>(z * u01(static_cast<uint64_t>(k * d + j + 99999)));
    }
  return c;
}

TEST(MlaReparam, EveryRotationIsOrthogonalAndHadamardMatchesItsDenseMatrix) {
  const int64_t d = 32, n = 200;
  const auto lat = anisotropic_latents(n, d);
  for (auto rot : {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca}) {
    const auto rp = parallel::make_tpla_reparam(d, 4, rot, 3, lat.data(), n);
    double max_orth = 0;
    for (int64_t k = 0; k < d; ++k)
      for (int64_t l = 0; l < d; ++l) {
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += rp.u[i * d + k] * rp.u[i * d + l];
        max_orth = std::max(max_orth, std::abs(s - (k == l ? 1.0 : 0.0)));
      }
    EXPECT_LT(max_orth, 1e-9) << parallel::rotation_name(rot);
    // rotate_rows (fast path) == rows x dense U.
    std::vector<float> rows(lat.begin(), lat.begin() + 3 * d);
    rp.rotate_rows(rows.data(), 3);
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t j = 0; j < d; ++j) {
        double s = 0;
        for (int64_t i = 0; i < d; ++i) s += lat[t * d + i] * rp.u[i * d + j];
        ASSERT_NEAR(rows[t * d + j], s, 1e-5) << parallel::rotation_name(rot);
      }
  }
}

TEST(MlaReparam, PcaSortsVarianceIntoTheFirstShards) {
  const int64_t d = 32, n = 400;
  const auto lat = anisotropic_latents(n, d);
  const auto rp = parallel::make_tpla_reparam(d, 2, TplaRotation::kPca, 0, lat.data(), n);
  std::vector<float> rows(lat);
  rp.rotate_rows(rows.data(), n);
  double e0 = 0, e1 = 0;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < d; ++j) (j < d / 2 ? e0 : e1) += rows[t * d + j] * rows[t * d + j];
  EXPECT_GT(e0, 10 * e1);
  for (size_t k = 0; k + 1 < rp.eigenvalues.size(); ++k)
    EXPECT_GE(rp.eigenvalues[k], rp.eigenvalues[k + 1]);
}

TEST(MlaReparam, MuIsTheLeastSquaresFitOfFullByShardLogits) {
  const int64_t d = 16, n = 50, m = 7;
  const auto lat = anisotropic_latents(n, d);
  std::vector<float> q(m * d);
  for (int64_t i = 0; i < m * d; ++i)
    q[i] = static_cast<float>(u01(static_cast<uint64_t>(i + 5000)) - 0.5);
  const auto rp =
      parallel::make_tpla_reparam(d, 2, TplaRotation::kNone, 0, lat.data(), n, q.data(), m);
  // Closed form for U = I: mu_i = sum(a_i a) / sum(a_i^2).
  for (int g = 0; g < 2; ++g) {
    double num = 0, den = 0;
    for (int64_t qi = 0; qi < m; ++qi)
      for (int64_t t = 0; t < n; ++t) {
        double a0 = 0, a1 = 0;
        for (int64_t j = 0; j < d / 2; ++j) a0 += q[qi * d + j] * lat[t * d + j];
        for (int64_t j = d / 2; j < d; ++j) a1 += q[qi * d + j] * lat[t * d + j];
        const double ai = g == 0 ? a0 : a1;
        num += ai * (a0 + a1);
        den += ai * ai;
      }
    EXPECT_NEAR(rp.mu[g], num / den, 1e-4 * std::abs(num / den));
  }
  // One group: the shard logit is the full logit.
  const auto one =
      parallel::make_tpla_reparam(d, 1, TplaRotation::kNone, 0, lat.data(), n, q.data(), m);
  EXPECT_FLOAT_EQ(one.mu[0], 1.0f);
}

TEST(MlaReparam, RegroupingOneRotationEqualsBuildingItForThatGroupCount) {
  // calibrate_tpla_mu on a g = 1 reparameterization regrouped to g gives make_tpla_reparam's
  // mu for g exactly (the accuracy bench regroups one U this way).
  const int64_t d = 32, n = 40, m = 12;
  std::vector<float> lat(n * d), q(m * d);
  for (int64_t i = 0; i < n * d; ++i) lat[i] = static_cast<float>(u01(i + 7) * (1 + i % 5));
  for (int64_t i = 0; i < m * d; ++i) q[i] = static_cast<float>(u01(i + 9001));
  for (auto rot : {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca})
    for (int g : {2, 4, 8}) {
      auto rp = parallel::make_tpla_reparam(d, 1, rot, 3, lat.data(), n);
      rp.groups = g;
      parallel::calibrate_tpla_mu(rp, lat.data(), n, q.data(), m);
      const auto want = parallel::make_tpla_reparam(d, g, rot, 3, lat.data(), n, q.data(), m);
      ASSERT_EQ(rp.mu.size(), static_cast<size_t>(g));
      for (int i = 0; i < g; ++i) EXPECT_EQ(rp.mu[i], want.mu[i]) << g << " " << i;
      // PCA decorrelates the shards on the calibration latents (sum_t c_i c_j^T = 0 for
      // i != j), so the cross terms of the fit vanish and mu = 1; the others fit mu != 1.
      if (rot == TplaRotation::kPca)
        EXPECT_NEAR(rp.mu[0], 1.0f, 1e-5);
      else
        EXPECT_GT(std::abs(rp.mu[0] - 1.0f), 1e-3) << parallel::rotation_name(rot) << " " << g;
    }
}

TEST(MlaReparam, SlicedAndExactRmsNormOfALatentSlice) {
  std::vector<float> s = {3.0f, 4.0f};  // |s|^2 = 25
  auto a = s;
  parallel::tpla_normalize_slice(a.data(), 2, parallel::TplaNorm::kSliced, 1e9, 8, 1e-6f);
  const double inv_s = 1.0 / std::sqrt(25.0 / 2 + 1e-6);
  EXPECT_NEAR(a[0], 3.0 * inv_s, 1e-6);
  EXPECT_NEAR(a[1], 4.0 * inv_s, 1e-6);
  auto b = s;
  parallel::tpla_normalize_slice(b.data(), 2, parallel::TplaNorm::kExact, 100.0, 8, 1e-6f);
  const double inv_e = 1.0 / std::sqrt(100.0 / 8 + 1e-6);
  EXPECT_NEAR(b[0], 3.0 * inv_e, 1e-6);
  EXPECT_NEAR(b[1], 4.0 * inv_e, 1e-6);
  EXPECT_THROW(
      parallel::tpla_normalize_slice(b.data(), 4, parallel::TplaNorm::kExact, 1.0, 2, 1e-6f),
      Error);
}

TEST(MlaReparam, RejectsWhatItCannotBuild) {
  EXPECT_THROW(parallel::make_tpla_reparam(48, 5, TplaRotation::kNone, 0), Error);
  EXPECT_THROW(parallel::make_tpla_reparam(48, 2, TplaRotation::kHadamard, 0), Error);
  EXPECT_THROW(parallel::make_tpla_reparam(64, 2, TplaRotation::kPca, 0), Error);  // no data
  EXPECT_THROW(parallel::parse_rotation("qr"), Error);
  EXPECT_EQ(parallel::parse_sharding("decode-cp"), parallel::MlaSharding::kDecodeCp);
  EXPECT_EQ(parallel::parse_norm("sliced"), parallel::TplaNorm::kSliced);
}

}  // namespace
}  // namespace distattn
