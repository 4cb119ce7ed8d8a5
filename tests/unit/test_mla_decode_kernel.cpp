// MLA decode kernel (ops::mla_decode) against a naive fp64 evaluation of the same formula
// over a shuffled paged cache: latent widths 512/256/128/16 + k_pe 64 (and none), partial
// pages, empty sequences, bf16 pages, both builds (portable / AVX-512), any split count.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "common/test_data.h"
#include "distattn/core/error.h"
#include "distattn/core/half.h"
#include "distattn/ops/mla.h"
#include "kernels/cpu/mla_cpu.h"

namespace distattn {
namespace {

struct Case {
  int64_t heads, latent, rope, page_size;
  std::vector<int32_t> lens;
  DType dtype = DType::kFloat32;
  float mu = 1.0f;
};

struct Built {
  Tensor q_lat, q_pe, pages, table, lens, out, lse;
  ops::MlaPagedCache cache;
};

Built build(const Case& c, uint64_t seed) {
  Built b;
  const int64_t batch = static_cast<int64_t>(c.lens.size());
  const int64_t w = c.latent + c.rope;
  int64_t max_pages = 1, total_pages = 0;
  for (int32_t l : c.lens) {
    const int64_t np = (l + c.page_size - 1) / c.page_size;
    max_pages = std::max(max_pages, np);
    total_pages += np;
  }
  total_pages += 2;  // unused pages in the pool
  b.q_lat = Tensor::empty({batch, c.heads, c.latent}, DType::kFloat32);
  b.q_pe = Tensor::empty({batch, c.heads, std::max<int64_t>(c.rope, 1)}, DType::kFloat32);
  testing::fill_test_data(b.q_lat, seed, 1);
  testing::fill_test_data(b.q_pe, seed, 2);
  Tensor pages32 = Tensor::empty({total_pages, c.page_size, w}, DType::kFloat32);
  testing::fill_test_data(pages32, seed, 3);
  // Scale up so the softmax is far from uniform (the test would not see mixing errors).
  for (int64_t i = 0; i < pages32.numel(); ++i) pages32.data_as<float>()[i] *= 3.0f;
  if (c.dtype == DType::kBFloat16) {
    b.pages = Tensor::empty({total_pages, c.page_size, w}, DType::kBFloat16);
    convert_dtype_cpu(pages32, b.pages);
  } else {
    b.pages = pages32;
  }
  // Shuffled page ids: sequence order is given only by the table.
  std::vector<int32_t> ids(static_cast<size_t>(total_pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::shuffle(ids.begin(), ids.end(), rng);
  b.table = Tensor::zeros({batch, max_pages}, DType::kInt32);
  b.lens = Tensor::empty({batch}, DType::kInt32);
  size_t next = 0;
  for (int64_t i = 0; i < batch; ++i) {
    b.lens.data_as<int32_t>()[i] = c.lens[static_cast<size_t>(i)];
    const int64_t np = (c.lens[static_cast<size_t>(i)] + c.page_size - 1) / c.page_size;
    for (int64_t p = 0; p < np; ++p) b.table.data_as<int32_t>()[i * max_pages + p] = ids[next++];
  }
  b.out = Tensor::empty({batch, c.heads, c.latent}, DType::kFloat32);
  b.lse = Tensor::empty({batch, c.heads}, DType::kFloat32);
  b.cache.pages = b.pages;
  b.cache.page_table = b.table;
  b.cache.seq_lens = b.lens;
  b.cache.latent_dim = c.latent;
  return b;
}

struct Ref {
  std::vector<double> out, lse;
};

Ref reference(const Case& c, const Built& b, float scale) {
  const int64_t batch = static_cast<int64_t>(c.lens.size()), w = c.latent + c.rope;
  const auto q_lat = testing::to_double_vector(b.q_lat);
  const auto q_pe = testing::to_double_vector(b.q_pe);
  const auto pages = testing::to_double_vector(b.pages);
  const int64_t qpw = b.q_pe.view().size(2), max_pages = b.table.view().size(1);
  Ref r;
  r.out.assign(static_cast<size_t>(batch * c.heads * c.latent), 0.0);
  r.lse.assign(static_cast<size_t>(batch * c.heads), -INFINITY);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t len = c.lens[static_cast<size_t>(i)];
    for (int64_t h = 0; h < c.heads; ++h) {
      std::vector<double> s(static_cast<size_t>(len));
      std::vector<const double*> rows(static_cast<size_t>(len));
      double mx = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t page = b.table.data_as<int32_t>()[i * max_pages + t / c.page_size];
        const double* row = pages.data() + (page * c.page_size + t % c.page_size) * w;
        double lat = 0, pe = 0;
        for (int64_t d = 0; d < c.latent; ++d)
          lat += q_lat[(i * c.heads + h) * c.latent + d] * row[d];
        for (int64_t d = 0; d < c.rope; ++d)
          pe += q_pe[(i * c.heads + h) * qpw + d] * row[c.latent + d];
        s[t] = scale * (c.mu * lat + pe);
        rows[t] = row;
        mx = std::max(mx, s[t]);
      }
      if (len == 0) continue;
      double l = 0;
      for (int64_t t = 0; t < len; ++t) l += std::exp(s[t] - mx);
      for (int64_t t = 0; t < len; ++t) {
        const double p = std::exp(s[t] - mx) / l;
        for (int64_t d = 0; d < c.latent; ++d)
          r.out[(i * c.heads + h) * c.latent + d] += p * rows[t][d];
      }
      r.lse[i * c.heads + h] = mx + std::log(l);
    }
  }
  return r;
}

using DecodeFn = void (*)(const TensorView&, const TensorView&, const ops::MlaPagedCache&,
                          const TensorView&, const TensorView&, const ops::MlaDecodeOptions&);

void check(const Case& c, int num_splits, DecodeFn fn, const char* what) {
  Built b = build(c, 42 + static_cast<uint64_t>(c.latent));
  ops::MlaDecodeOptions opts;
  opts.softmax_scale = 1.0f / std::sqrt(192.0f);
  opts.latent_logit_scale = c.mu;
  opts.num_splits = num_splits;
  TensorView q_pe = c.rope > 0 ? b.q_pe.view().slice(2, 0, c.rope) : TensorView{};
  fn(b.q_lat, q_pe, b.cache, b.out, b.lse, opts);
  const Ref r = reference(c, b, opts.softmax_scale);
  const auto so = testing::compare(testing::to_double_vector(b.out), r.out);
  const auto sl = testing::compare(testing::to_double_vector(b.lse), r.lse);
  EXPECT_EQ(so.non_finite, 0) << what;
  EXPECT_EQ(sl.non_finite, 0) << what;  // -inf where the reference has -inf counts as equal
  EXPECT_LT(so.rel(), 2e-6) << what << " Dl=" << c.latent << " splits=" << num_splits;
  EXPECT_LT(sl.max_abs_err, 2e-5) << what << " Dl=" << c.latent;
  // Empty sequences: out exactly 0, lse -inf.
  for (size_t i = 0; i < c.lens.size(); ++i) {
    if (c.lens[i] != 0) continue;
    for (int64_t h = 0; h < c.heads; ++h) {
      EXPECT_TRUE(std::isinf(b.lse.data_as<float>()[i * c.heads + h]));
      for (int64_t d = 0; d < c.latent; ++d)
        ASSERT_EQ(b.out.data_as<float>()[(i * c.heads + h) * c.latent + d], 0.0f);
    }
  }
}

TEST(MlaDecodeKernel, MatchesFp64ReferenceAtDeepSeekWidths) {
  for (int64_t latent : {512, 256, 128}) {
    Case c{6, latent, 64, 64, {1, 130, 64, 200}};
    check(c, 0, &ops::mla_decode, "dispatch");
  }
}

TEST(MlaDecodeKernel, SmallWidthsPartialPagesEmptySequencesAndMu) {
  Case c{9, 16, 8, 16, {0, 5, 17, 64, 333}, DType::kFloat32, 0.7f};
  check(c, 0, &ops::mla_decode, "small");
  Case nr{4, 64, 0, 16, {70, 3}};  // no RoPE part
  check(nr, 0, &ops::mla_decode, "no-rope");
}

TEST(MlaDecodeKernel, Bf16PagesMatchReferenceOnTheSameRoundedValues) {
  Case c{8, 256, 64, 64, {300, 77}, DType::kBFloat16};
  check(c, 0, &ops::mla_decode, "bf16");
}

TEST(MlaDecodeKernel, AnySplitCountAndBothBuildsGiveTheSameResult) {
  Case c{5, 128, 64, 32, {1000, 250, 1}};
  const int saved = omp_get_max_threads();
  omp_set_num_threads(2);
  for (int splits : {1, 2, 3, 7, 40}) {
    check(c, splits, &kernels::cpu::mla_decode_portable, "portable");
    if (kernels::cpu::mla_decode_avx512_available())
      check(c, splits, &kernels::cpu::mla_decode_avx512, "avx512");
  }
  omp_set_num_threads(saved);
}

// The AMX tiles (bf16 pages; q and P in three bf16 parts) at the fp32 tolerance: partial
// head blocks (heads not a multiple of 16), widths not a multiple of 32, no RoPE, partial
// pages and empty sequences, several split counts.
TEST(MlaDecodeKernel, AmxTilesOnBf16PagesMatchReference) {
  if (!kernels::cpu::mla_decode_amx_available())
    GTEST_SKIP() << "no AMX tiles on this CPU or build (the amx kernel level is unavailable)";
  const int saved = omp_get_max_threads();
  omp_set_num_threads(2);
  const std::vector<Case> cases = {
      Case{20, 512, 64, 64, {130, 64, 1}, DType::kBFloat16},
      Case{9, 16, 8, 16, {0, 5, 17, 64, 333}, DType::kBFloat16, 0.7f},
      Case{4, 64, 0, 16, {70, 3}, DType::kBFloat16},
      Case{32, 128, 64, 32, {1000, 250}, DType::kBFloat16},
  };
  for (const Case& c : cases)
    for (int splits : {0, 1, 3}) check(c, splits, &kernels::cpu::mla_decode_amx, "amx");
  omp_set_num_threads(saved);
}

TEST(MlaDecodeKernel, RejectsInconsistentInputs) {
  Case c{4, 64, 16, 16, {40}};
  Built b = build(c, 7);
  ops::MlaDecodeOptions opts;
  opts.softmax_scale = 0.1f;
  TensorView q_pe = b.q_pe.view().slice(2, 0, 16);
  EXPECT_NO_THROW(ops::mla_decode(b.q_lat, q_pe, b.cache, b.out, b.lse, opts));
  ops::MlaDecodeOptions unset;
  EXPECT_THROW(ops::mla_decode(b.q_lat, q_pe, b.cache, b.out, b.lse, unset), Error);
  ops::MlaPagedCache bad = b.cache;
  bad.latent_dim = 32;
  EXPECT_THROW(ops::mla_decode(b.q_lat, q_pe, bad, b.out, b.lse, opts), Error);
  b.table.data_as<int32_t>()[1] = 99;  // page id out of range
  EXPECT_THROW(ops::mla_decode(b.q_lat, q_pe, b.cache, b.out, b.lse, opts), Error);
  b.table.data_as<int32_t>()[1] = 0;
  b.lens.data_as<int32_t>()[0] = 1000;  // longer than the table covers
  EXPECT_THROW(ops::mla_decode(b.q_lat, q_pe, b.cache, b.out, b.lse, opts), Error);
}

TEST(MlaDecodeKernel, WorkModelCountsFlopsAndBytes) {
  EXPECT_DOUBLE_EQ(ops::mla_decode_flops(128, 1000, 512, 64), 2.0 * 128 * 1000 * 1088);
  EXPECT_DOUBLE_EQ(ops::mla_decode_bytes(1000, 256, 64, DType::kBFloat16), 1000.0 * 320 * 2);
}

}  // namespace
}  // namespace distattn
