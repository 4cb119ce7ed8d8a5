// CUDA MLA decode and batched Hadamard transform against fp64 host references, on fresh
// deterministic inputs with NaN-poisoned outputs. Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/config.h"
#include "distattn/ops/mla.h"
#include "tests/cuda/cuda_test_util.h"
#if DISTATTN_WITH_CUDA
#include "kernels/cuda/mla_cuda.h"
#endif

namespace distattn::testing {
namespace {

#if DISTATTN_WITH_CUDA
namespace kc = kernels::cuda;

class CudaMla : public ::testing::Test {
 protected:
  void SetUp() override { DISTATTN_SKIP_WITHOUT_GPU(); }
};

struct MlaCase {
  int64_t Dl, Dr, H;
  DType cache_dtype;
  int splits;
};

// Widths 512/256/128 + 64 (and no rope, and an odd rope width), head counts not a multiple of the
// 16-head block, fp32 and bf16 caches, automatic and forced splits.
const MlaCase kMlaCases[] = {
    {512, 64, 16, DType::kBFloat16, 0},
    {512, 64, 20, DType::kFloat32, 3},
    {256, 64, 8, DType::kBFloat16, 1},
    {128, 64, 33, DType::kBFloat16, 0},
    {128, 0, 5, DType::kFloat32, 2},
    {128, 3, 7, DType::kBFloat16, 2},  // row width 131: not 16-byte multiple, scalar loads
};

TEST_F(CudaMla, DecodeMatchesFp64Reference) {
  const int64_t page = 64;
  const std::vector<int32_t> lens = {0, 1, 63, 300, 129};
  const int64_t B = static_cast<int64_t>(lens.size());
  const int64_t max_len = 300, max_pages = (max_len + page - 1) / page;
  for (const MlaCase& c : kMlaCases) {
    SCOPED_TRACE("Dl " + std::to_string(c.Dl) + " Dr " + std::to_string(c.Dr) + " H " +
                 std::to_string(c.H) + " " + dtype_name(c.cache_dtype) + " splits " +
                 std::to_string(c.splits));
    const int64_t W = c.Dl + c.Dr, num_pages = B * max_pages + 1;
    Tensor pages = Tensor::empty({num_pages, page, W}, c.cache_dtype);
    fill_test_data(pages, 11, 0);
    Tensor q_lat = Tensor::empty({B, c.H, c.Dl}, DType::kFloat32);
    fill_test_data(q_lat, 11, 1);
    Tensor q_pe = Tensor::empty({B, c.H, std::max<int64_t>(c.Dr, 1)}, DType::kFloat32);
    fill_test_data(q_pe, 11, 2);
    TensorView q_pe_view = q_pe.view().slice(2, 0, c.Dr);
    Tensor pt = Tensor::empty({B, max_pages}, DType::kInt32);
    Tensor sl = Tensor::empty({B}, DType::kInt32);
    for (int64_t b = 0; b < B; ++b) {
      sl.data_as<int32_t>()[b] = lens[static_cast<size_t>(b)];
      for (int64_t p = 0; p < max_pages; ++p)  // interleaved, out of order
        pt.data_as<int32_t>()[b * max_pages + p] =
            static_cast<int32_t>(num_pages - 1 - (p * B + b));
    }
    const float scale = 0.1352f, mu = 0.8f;

    // fp64 reference on the rounded cache values.
    const std::vector<double> pv = to_double_vector(pages);
    std::vector<double> ref_out(static_cast<size_t>(B * c.H * c.Dl), 0.0);
    std::vector<double> ref_lse(static_cast<size_t>(B * c.H), -INFINITY);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = lens[static_cast<size_t>(b)];
      for (int64_t h = 0; h < c.H; ++h) {
        if (len == 0) continue;
        std::vector<double> s(static_cast<size_t>(len));
        double mx = -INFINITY;
        for (int64_t t = 0; t < len; ++t) {
          const int64_t pg = pt.data_as<int32_t>()[b * max_pages + t / page];
          const double* row = pv.data() + (pg * page + t % page) * W;
          double lat = 0, pe = 0;
          for (int64_t d = 0; d < c.Dl; ++d)
            lat += q_lat.data_as<float>()[(b * c.H + h) * c.Dl + d] * row[d];
          for (int64_t d = 0; d < c.Dr; ++d)
            pe += q_pe.data_as<float>()[(b * c.H + h) * q_pe.view().size(2) + d] * row[c.Dl + d];
          s[static_cast<size_t>(t)] =
              static_cast<double>(scale) * (static_cast<double>(mu) * lat + pe);
          mx = std::max(mx, s[static_cast<size_t>(t)]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        ref_lse[static_cast<size_t>(b * c.H + h)] = mx + std::log(sum);
        for (int64_t t = 0; t < len; ++t) {
          const int64_t pg = pt.data_as<int32_t>()[b * max_pages + t / page];
          const double* row = pv.data() + (pg * page + t % page) * W;
          for (int64_t d = 0; d < c.Dl; ++d)
            ref_out[static_cast<size_t>((b * c.H + h) * c.Dl + d)] +=
                s[static_cast<size_t>(t)] / sum * row[d];
        }
      }
    }

    Tensor pages_d = to_device(pages.view(), gpu());
    Tensor pt_d = to_device(pt.view(), gpu()), sl_d = to_device(sl.view(), gpu());
    Tensor ql_d = to_device(q_lat.view(), gpu()), qp_d = to_device(q_pe.view(), gpu());
    TensorView qp_view = qp_d.view().slice(2, 0, c.Dr);
    Tensor out = poisoned({B, c.H, c.Dl}, DType::kFloat32, gpu());
    Tensor lse = poisoned({B, c.H}, DType::kFloat32, gpu());
    ops::MlaPagedCache cache{pages_d.view(), pt_d.view(), sl_d.view(), c.Dl};
    ops::MlaDecodeOptions o;
    o.softmax_scale = scale;
    o.latent_logit_scale = mu;
    o.num_splits = c.splits;
    kc::mla_decode(ql_d, qp_view, cache, out, lse, o, max_len);
    (void)q_pe_view;
    const ErrorStats so = compare(to_double_vector(out), ref_out);
    const ErrorStats sl_ = compare(to_double_vector(lse), ref_lse);
    EXPECT_EQ(so.non_finite, 0);
    EXPECT_EQ(sl_.non_finite, 0);
    // fp32 accumulation over <= 300 tokens of <= 576-wide rows.
    EXPECT_LE(so.max_abs_err, 1e-5 * so.max_ref) << "out relative " << so.rel();
    EXPECT_LE(sl_.max_abs_err, 1e-5 * sl_.max_ref) << "lse relative " << sl_.rel();
    const std::vector<double> got = to_double_vector(out);
    for (int64_t i = 0; i < c.H * c.Dl; ++i) EXPECT_EQ(got[static_cast<size_t>(i)], 0.0);  // len 0
  }
}

// fp64 Sylvester-order FWHT (validated below against the definition on small sizes).
void fwht_ref(std::vector<double>& x, size_t off, size_t d) {
  for (size_t h = 1; h < d; h <<= 1)
    for (size_t i = 0; i < d; i += 2 * h)
      for (size_t j = i; j < i + h; ++j) {
        const double a = x[off + j], b = x[off + j + h];
        x[off + j] = a + b;
        x[off + j + h] = a - b;
      }
}

TEST_F(CudaMla, HadamardMatchesFp64TransformEveryWidth) {
  {
    // The reference itself: H[i][j] = (-1)^popcount(i & j).
    const size_t d = 16;
    std::vector<double> x(d), y(d, 0.0);
    for (size_t i = 0; i < d; ++i) x[i] = static_cast<double>(i * i % 7) - 3.0;
    for (size_t i = 0; i < d; ++i)
      for (size_t j = 0; j < d; ++j) y[i] += (__builtin_popcountll(i & j) % 2 ? -1.0 : 1.0) * x[j];
    fwht_ref(x, 0, d);
    for (size_t i = 0; i < d; ++i) ASSERT_EQ(x[i], y[i]);
  }
  for (int64_t d : {1, 2, 64, 512, 8192, 16384, 131072}) {
    SCOPED_TRACE("d " + std::to_string(d));
    const int64_t rows = d >= 16384 ? 3 : 5, pad = 16;
    // Rows padded apart: a strided [rows, d] view.
    Tensor host = Tensor::empty({rows, d + pad}, DType::kFloat32);
    fill_test_data(host, 21, static_cast<uint64_t>(d));
    Tensor dev = to_device(host.view(), gpu());
    TensorView x = dev.view().slice(1, 0, d);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
    kc::hadamard_transform(x, scale, nullptr);
    std::vector<double> ref = to_double_vector(host.view().slice(1, 0, d));
    for (int64_t r = 0; r < rows; ++r)
      fwht_ref(ref, static_cast<size_t>(r * d), static_cast<size_t>(d));
    for (double& v : ref) v *= static_cast<double>(scale);
    const ErrorStats s = compare(to_double_vector(x), ref);
    EXPECT_EQ(s.non_finite, 0);
    // fp32 butterflies: log2(d) roundings of O(|x| sqrt(d)) magnitudes.
    EXPECT_LE(s.max_abs_err, 1e-6 * std::max(1.0, std::log2(static_cast<double>(d))) * s.max_ref)
        << "relative " << s.rel();
    // The padding between rows is untouched.
    const std::vector<double> pad_got = to_double_vector(dev.view().slice(1, d, pad));
    const std::vector<double> pad_want = to_double_vector(host.view().slice(1, d, pad));
    EXPECT_EQ(pad_got, pad_want);
  }
}

// Through the public op: CUDA tensors reach the CUDA kernel (same result as the CPU op).
TEST_F(CudaMla, OpsDispatchCudaTensorsToTheGpuKernels) {
  const int64_t B = 2, H = 4, Dl = 128, Dr = 64, page = 64, pages = 6;
  Tensor pages_h = Tensor::empty({pages, page, Dl + Dr}, DType::kBFloat16);
  fill_test_data(pages_h, 5, 0);
  Tensor ql = Tensor::empty({B, H, Dl}, DType::kFloat32),
         qp = Tensor::empty({B, H, Dr}, DType::kFloat32);
  fill_test_data(ql, 5, 1);
  fill_test_data(qp, 5, 2);
  Tensor pt = Tensor::empty({B, 3}, DType::kInt32), sl = Tensor::empty({B}, DType::kInt32);
  for (int i = 0; i < 6; ++i) pt.data_as<int32_t>()[i] = 5 - i;
  sl.data_as<int32_t>()[0] = 150;
  sl.data_as<int32_t>()[1] = 7;
  ops::MlaDecodeOptions o;
  o.softmax_scale = 0.125f;
  Tensor out_h = Tensor::empty({B, H, Dl}, DType::kFloat32),
         lse_h = Tensor::empty({B, H}, DType::kFloat32);
  ops::mla_decode(ql, qp, {pages_h.view(), pt.view(), sl.view(), Dl}, out_h, lse_h, o);
  Tensor pd = to_device(pages_h.view(), gpu()), ptd = to_device(pt.view(), gpu());
  Tensor sld = to_device(sl.view(), gpu());
  Tensor qld = to_device(ql.view(), gpu()), qpd = to_device(qp.view(), gpu());
  Tensor out = poisoned({B, H, Dl}, DType::kFloat32, gpu()),
         lse = poisoned({B, H}, DType::kFloat32, gpu());
  ops::mla_decode(qld, qpd, {pd.view(), ptd.view(), sld.view(), Dl}, out, lse, o);
  const ErrorStats so = compare(to_double_vector(out), to_double_vector(out_h));
  const ErrorStats sl_ = compare(to_double_vector(lse), to_double_vector(lse_h));
  EXPECT_EQ(so.non_finite + sl_.non_finite, 0);
  EXPECT_LE(so.max_abs_err, 1e-5 * so.max_ref);
  EXPECT_LE(sl_.max_abs_err, 1e-5 * sl_.max_ref);

  Tensor x = Tensor::empty({3, 256}, DType::kFloat32);
  fill_test_data(x, 5, 9);
  Tensor xd = to_device(x.view(), gpu());
  ops::hadamard_transform(x, 0.0625f);
  ops::hadamard_transform(xd, 0.0625f);
  const ErrorStats sh = compare(to_double_vector(xd), to_double_vector(x));
  EXPECT_EQ(sh.non_finite, 0);
  EXPECT_LE(sh.max_abs_err, 1e-5 * sh.max_ref);
}

// More sequences than gridDim.y takes (65535): the kernel spreads them over grid y and z
// (with the splits in z too). Every sequence has its own page and length (0 to 4 tokens),
// so a block computing the wrong sequence fails; checked against the CPU op.
TEST_F(CudaMla, ManySequencesBeyondTheGridYLimit) {
  const int64_t B = 65600, H = 3, Dl = 32, Dr = 8, page = 4, W = Dl + Dr;
  Tensor pages = Tensor::empty({B, page, W}, DType::kBFloat16);
  fill_test_data(pages, 17, 0);
  Tensor ql = Tensor::empty({B, H, Dl}, DType::kFloat32),
         qp = Tensor::empty({B, H, Dr}, DType::kFloat32);
  fill_test_data(ql, 17, 1);
  fill_test_data(qp, 17, 2);
  Tensor pt = Tensor::empty({B, 1}, DType::kInt32), sl = Tensor::empty({B}, DType::kInt32);
  for (int64_t b = 0; b < B; ++b) {
    pt.data_as<int32_t>()[b] = static_cast<int32_t>(B - 1 - b);
    sl.data_as<int32_t>()[b] = static_cast<int32_t>(b % 5);
  }
  ops::MlaDecodeOptions o;
  o.softmax_scale = 0.2f;
  Tensor out_h = Tensor::empty({B, H, Dl}, DType::kFloat32),
         lse_h = Tensor::empty({B, H}, DType::kFloat32);
  ops::mla_decode(ql, qp, {pages.view(), pt.view(), sl.view(), Dl}, out_h, lse_h, o);
  Tensor pd = to_device(pages.view(), gpu()), ptd = to_device(pt.view(), gpu());
  Tensor sld = to_device(sl.view(), gpu());
  Tensor qld = to_device(ql.view(), gpu()), qpd = to_device(qp.view(), gpu());
  for (int splits : {0, 2}) {
    SCOPED_TRACE("splits " + std::to_string(splits));
    Tensor out = poisoned({B, H, Dl}, DType::kFloat32, gpu()),
           lse = poisoned({B, H}, DType::kFloat32, gpu());
    o.num_splits = splits;
    kc::mla_decode(qld, qpd, {pd.view(), ptd.view(), sld.view(), Dl}, out, lse, o, 4);
    const ErrorStats so = compare(to_double_vector(out), to_double_vector(out_h));
    const ErrorStats sl_ = compare(to_double_vector(lse), to_double_vector(lse_h));
    EXPECT_EQ(so.non_finite, 0);
    EXPECT_EQ(sl_.non_finite, 0);
    EXPECT_LE(so.max_abs_err, 1e-5 * so.max_ref);
    EXPECT_LE(sl_.max_abs_err, 1e-5 * sl_.max_ref);
  }
}

#else
TEST(CudaMla, SkippedWithoutCudaBuild) {
  GTEST_SKIP() << "skipped: built without CUDA";
}
#endif

}  // namespace
}  // namespace distattn::testing
