// LSE merge, flash-decoding over a contiguous cache and over a paged cache, each against the
// fp64 reference over the equivalent contiguous keys.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>

#include "kernels/cpu/flash_cpu.h"
#include "tests/unit/attention_test_util.h"

namespace distattn::testing {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

TEST(AttentionMerge, TwoKeyHalvesEqualTheWhole) {
  const int64_t B = 2, Sq = 13, Sk = 40, H = 4, D = 32, split = 17;
  Tensor q = make_input({B, Sq, H, D}, DType::kFloat32, 20, 0);
  Tensor k = make_input({B, Sk, H, D}, DType::kFloat32, 20, 1);
  Tensor v = make_input({B, Sk, H, D}, DType::kFloat32, 20, 2);
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = 20;  // rows 0..3 see only the first half, later rows both
  Tensor oa = Tensor::empty({B, Sq, H, D}, DType::kFloat32),
         la = Tensor::empty({B, H, Sq}, DType::kFloat32);
  Tensor ob = Tensor::empty({B, Sq, H, D}, DType::kFloat32),
         lb = Tensor::empty({B, H, Sq}, DType::kFloat32);
  ops::attention_forward(q, k.view().slice(1, 0, split), v.view().slice(1, 0, split), oa, la, o);
  ops::AttentionOptions o2 = o;
  o2.k_offset = split;
  ops::attention_forward(q, k.view().slice(1, split, Sk - split),
                         v.view().slice(1, split, Sk - split), ob, lb, o2);
  auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
  Tensor out = Tensor::empty({B, Sq, H, D}, DType::kFloat32),
         lse = Tensor::empty({B, H, Sq}, DType::kFloat32);
  ops::attention_merge(oa, la, ob, lb, out, lse);
  expect_close(out, ref.out, 1e-5, "merged out");
  expect_close(lse, ref.lse, 1e-5, "merged lse");
  // In place into the first partial, and symmetric in its arguments.
  ops::attention_merge(ob, lb, oa, la, oa, la);
  expect_close(oa, ref.out, 1e-5, "in-place out");
  expect_close(la, ref.lse, 1e-5, "in-place lse");
}

TEST(AttentionMerge, MaskedSidesAreNaNSafe) {
  const int64_t D = 3;
  Tensor oa = Tensor::empty({1, 3, 1, D}, DType::kFloat32),
         la = Tensor::empty({1, 1, 3}, DType::kFloat32);
  Tensor ob = Tensor::empty({1, 3, 1, D}, DType::kFloat32),
         lb = Tensor::empty({1, 1, 3}, DType::kFloat32);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // row 0: both masked (outs hold NaN garbage); row 1: only b visible; row 2: equal lse.
  const float a_lse[3] = {kNegInf, kNegInf, 0.5f}, b_lse[3] = {kNegInf, 1.0f, 0.5f};
  for (int i = 0; i < 3; ++i) {
    la.data_as<float>()[i] = a_lse[i];
    lb.data_as<float>()[i] = b_lse[i];
    for (int e = 0; e < D; ++e) {
      oa.data_as<float>()[i * D + e] = i < 2 ? nan : 2.0f;
      ob.data_as<float>()[i * D + e] = i == 0 ? nan : 4.0f;
    }
  }
  Tensor out = Tensor::empty({1, 3, 1, D}, DType::kFloat32),
         lse = Tensor::empty({1, 1, 3}, DType::kFloat32);
  ops::attention_merge(oa, la, ob, lb, out, lse);
  const float* o = out.data_as<float>();
  EXPECT_EQ(lse.data_as<float>()[0], kNegInf);
  EXPECT_FLOAT_EQ(lse.data_as<float>()[1], 1.0f);
  EXPECT_FLOAT_EQ(lse.data_as<float>()[2], 0.5f + std::log(2.0f));
  for (int e = 0; e < D; ++e) {
    EXPECT_EQ(o[e], 0.0f);
    EXPECT_EQ(o[D + e], 4.0f);
    EXPECT_FLOAT_EQ(o[2 * D + e], 3.0f);
  }
}

struct DecodeCase {
  DType dtype;
  int64_t sq, sk;
  int num_splits;
};

class AttentionDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(AttentionDecode, MatchesReference) {
  const DecodeCase c = GetParam();
  const int64_t B = 3, Hq = 8, Hkv = 2, D = 64, Dv = 64;
  const uint64_t seed = 400 + static_cast<uint64_t>(c.sq * 7 + c.sk + c.num_splits);
  Tensor q = make_input({B, c.sq, Hq, D}, c.dtype, seed, 0);
  Tensor k = make_input({B, c.sk, Hkv, D}, c.dtype, seed, 1);
  Tensor v = make_input({B, c.sk, Hkv, Dv}, c.dtype, seed, 2);
  Tensor out = Tensor::empty({B, c.sq, Hq, Dv}, c.dtype);
  Tensor lse = Tensor::empty({B, Hq, c.sq}, DType::kFloat32);
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = c.sk - c.sq;  // the new tokens sit at the end of the cache
  ops::attention_decode(q, k, v, out, lse, o, {.num_splits = c.num_splits});
  auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
  expect_close(out, ref.out, tolerance(c.dtype), "out");
  expect_close(lse, ref.lse, 1e-5, "lse");
}

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> v;
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
    for (int64_t sq : {1, 4, 16})
      for (int64_t sk : {1, 7, 131, 600})
        for (int splits : {0, 1, 7}) v.push_back({dt, sq, sk, splits});
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, AttentionDecode, ::testing::ValuesIn(decode_cases()),
                         [](const ::testing::TestParamInfo<DecodeCase>& i) {
                           return std::string(dtype_name(i.param.dtype)) + "_q" +
                                  std::to_string(i.param.sq) + "_k" + std::to_string(i.param.sk) +
                                  "_s" + std::to_string(i.param.num_splits);
                         });

// Every CPU instruction set this machine has, forced in turn: the AVX-512 levels run the
// streaming decode tiles for up to 16 query rows per KV head (rows in groups of 4, 2, 1;
// keys in blocks of 16 with a partial last block; head dims with partial vectors, fp32,
// bf16 through word splitting or vdpbf16ps, fp16), more rows take flash_forward. fp32
// outputs, so that every path is held to fp32 accuracy against the fp64 reference on the
// same rounded inputs.
TEST(AttentionDecode, StreamingTilesOnEveryInstructionSet) {
  using kernels::cpu::CpuKernelIsa;
  struct Shape {
    int64_t hq, hkv, sq, sk, d, dv;
  };
  const std::vector<Shape> shapes{
      {32, 8, 1, 600, 128, 128},  // R 4, the GQA decode step
      {8, 8, 1, 17, 64, 64},      // R 1, one key past a block
      {6, 2, 1, 16, 40, 24},      // R 3 (2 + 1), exactly one block, partial vectors
      {10, 2, 1, 33, 200, 72},    // R 5 (4 + 1), D over 8 vectors
      {4, 1, 2, 1, 7, 3},         // R 8, one key, tiny dims
      {16, 2, 2, 129, 96, 160},   // R 16, four groups
      {16, 1, 2, 70, 64, 64},     // R 32: more rows than the tiles take
  };
  int checked = 0;
  for (CpuKernelIsa isa : {CpuKernelIsa::kPortable, CpuKernelIsa::kAvx2, CpuKernelIsa::kAvx512,
                           CpuKernelIsa::kAvx512Bf16, CpuKernelIsa::kAmx}) {
    if (!kernels::cpu::cpu_kernel_isa_available(isa)) {
      std::printf("[ info ] %s not available here: its decode path is not tested\n",
                  kernels::cpu::cpu_kernel_isa_name(isa));
      continue;
    }
    kernels::cpu::set_cpu_kernel_isa(isa);
    for (const Shape& sh : shapes)
      for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
        for (int splits : {1, 0}) {
          const uint64_t seed = 900 + static_cast<uint64_t>(sh.sk + sh.d + splits);
          Tensor q = make_input({2, sh.sq, sh.hq, sh.d}, dt, seed, 0);
          Tensor k = make_input({2, sh.sk, sh.hkv, sh.d}, dt, seed, 1);
          Tensor v = make_input({2, sh.sk, sh.hkv, sh.dv}, dt, seed, 2);
          Tensor out = Tensor::empty({2, sh.sq, sh.hq, sh.dv}, DType::kFloat32);
          Tensor lse = Tensor::empty({2, sh.hq, sh.sq}, DType::kFloat32);
          ops::AttentionOptions o;
          o.causal = true;
          o.q_offset = sh.sk - sh.sq;
          ops::attention_decode(q, k, v, out, lse, o, {.num_splits = splits});
          auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
          const std::string what = std::string(kernels::cpu::cpu_kernel_isa_name(isa)) + " " +
                                   dtype_name(dt) + " hq " + std::to_string(sh.hq) + " sq " +
                                   std::to_string(sh.sq) + " sk " + std::to_string(sh.sk) + " d " +
                                   std::to_string(sh.d) + " splits " + std::to_string(splits);
          expect_close(out, ref.out, 1e-5, what + " out");
          expect_close(lse, ref.lse, 1e-5, what + " lse");
          ++checked;
        }
  }
  kernels::cpu::set_cpu_kernel_isa(CpuKernelIsa::kAuto);
  EXPECT_GT(checked, 0);
}

TEST(AttentionDecode, WindowAndKeyOffsetAcrossSplits) {
  const int64_t B = 1, Sq = 2, Sk = 300, H = 2, D = 32;
  Tensor q = make_input({B, Sq, H, D}, DType::kFloat32, 21, 0);
  Tensor k = make_input({B, Sk, H, D}, DType::kFloat32, 21, 1);
  Tensor v = make_input({B, Sk, H, D}, DType::kFloat32, 21, 2);
  ops::AttentionOptions o;
  o.causal = true;
  o.k_offset = 1000;
  o.q_offset = 1000 + Sk - Sq;
  o.window_left = 70;  // most splits are fully masked for every query
  Tensor out = Tensor::empty({B, Sq, H, D}, DType::kFloat32),
         lse = Tensor::empty({B, H, Sq}, DType::kFloat32);
  ops::attention_decode(q, k, v, out, lse, o, {.num_splits = 9});
  auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
  expect_close(out, ref.out, 1e-5, "out");
  expect_close(lse, ref.lse, 1e-5, "lse");
}

// Chunks are cut where the mask changes (causal and both window edges, for the first and
// the last query): every combination must still equal the reference.
TEST(AttentionDecode, MaskCutsMatchReference) {
  const int64_t B = 2, Sq = 5, Sk = 333, Hq = 6, Hkv = 2, D = 32;
  Tensor q = make_input({B, Sq, Hq, D}, DType::kBFloat16, 22, 0);
  Tensor k = make_input({B, Sk, Hkv, D}, DType::kBFloat16, 22, 1);
  Tensor v = make_input({B, Sk, Hkv, D}, DType::kBFloat16, 22, 2);
  struct Mask {
    bool causal;
    int64_t wl, wr, q_offset, k_offset;
  };
  const Mask masks[] = {{true, -1, -1, Sk - Sq, 0},     {true, 40, -1, Sk - Sq, 0},
                        {false, 30, 7, 100, 0},         {false, -1, 12, 50, 10},
                        {true, 3, -1, 200, 150},        {false, 0, 0, 90, 0},
                        {true, -1, -1, Sk - Sq - 60, 0}};
  for (const Mask& m : masks)
    for (int splits : {0, 1, 5}) {
      ops::AttentionOptions o;
      o.causal = m.causal;
      o.window_left = m.wl;
      o.window_right = m.wr;
      o.q_offset = m.q_offset;
      o.k_offset = m.k_offset;
      Tensor out = Tensor::empty({B, Sq, Hq, D}, DType::kFloat32);
      Tensor lse = Tensor::empty({B, Hq, Sq}, DType::kFloat32);
      ops::attention_decode(q, k, v, out, lse, o, {.num_splits = splits});
      auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
      const std::string what = "causal " + std::to_string(m.causal) + " window " +
                               std::to_string(m.wl) + "/" + std::to_string(m.wr) + " offsets " +
                               std::to_string(m.q_offset) + "/" + std::to_string(m.k_offset) +
                               " splits " + std::to_string(splits);
      expect_close(out, ref.out, 1e-5, what + " out");
      expect_close(lse, ref.lse, 1e-5, what + " lse");
    }
}

// A paged cache holding the same keys as a contiguous one, pages in shuffled order.
struct PagedFixture {
  int64_t B, max_pages, ps, Hkv, D, Dv;
  std::vector<int32_t> lens;
  Tensor k_contig, v_contig;  // [B, max_pages*ps, Hkv, D]
  Tensor k_pool, v_pool;      // [num_pages(+pad), ps, Hkv, D] storage
  TensorView k_pages, v_pages;
  Tensor page_table, seq_lens;

  PagedFixture(DType dt, std::vector<int32_t> l, int64_t page_size, bool padded_pool, bool shuffle,
               uint64_t seed)
      : B(static_cast<int64_t>(l.size())), ps(page_size), Hkv(2), D(64), Dv(48), lens(l) {
    int64_t maxlen = *std::max_element(lens.begin(), lens.end());
    max_pages = std::max<int64_t>(1, (maxlen + ps - 1) / ps);
    const int64_t S = max_pages * ps;
    k_contig = make_input({B, S, Hkv, D}, dt, seed, 1);
    v_contig = make_input({B, S, Hkv, Dv}, dt, seed, 2);
    const int64_t P = B * max_pages + 3;  // spare pages nobody uses
    std::vector<int32_t> ids(static_cast<size_t>(P));
    std::iota(ids.begin(), ids.end(), 0);
    if (shuffle) std::shuffle(ids.begin(), ids.end(), std::mt19937(static_cast<unsigned>(seed)));
    // Padded pools put a gap between pages, so no run of pages is one strided view.
    const int64_t gap = padded_pool ? 1 : 0;
    auto make_pool = [&](Tensor& store, int64_t dim) {
      store = Tensor::zeros({P, ps + gap, Hkv, dim}, dt);
      const int64_t shape[4] = {P, ps, Hkv, dim};
      const int64_t strides[4] = {(ps + gap) * Hkv * dim, Hkv * dim, dim, 1};
      return TensorView(store.data(), dt, Device::cpu(), shape, strides);
    };
    k_pages = make_pool(k_pool, D);
    v_pages = make_pool(v_pool, Dv);
    page_table = Tensor::empty({B, max_pages}, DType::kInt32);
    seq_lens = Tensor::empty({B}, DType::kInt32);
    const size_t es = dtype_size(dt);
    for (int64_t b = 0; b < B; ++b) {
      seq_lens.data_as<int32_t>()[b] = lens[static_cast<size_t>(b)];
      for (int64_t p = 0; p < max_pages; ++p) {
        const int32_t id = ids[static_cast<size_t>(b * max_pages + p)];
        page_table.data_as<int32_t>()[b * max_pages + p] = id;
        for (int64_t t = 0; t < ps; ++t) {
          const int64_t ksrc[4] = {b, p * ps + t, 0, 0}, kdst[4] = {id, t, 0, 0};
          std::memcpy(k_pages.element_ptr(kdst), k_contig.view().element_ptr(ksrc),
                      static_cast<size_t>(Hkv * D) * es);
          std::memcpy(v_pages.element_ptr(kdst), v_contig.view().element_ptr(ksrc),
                      static_cast<size_t>(Hkv * Dv) * es);
        }
      }
    }
  }
  ops::PagedKV cache() const { return {k_pages, v_pages, page_table, seq_lens}; }
};

struct PagedCase {
  DType dtype;
  int64_t sq;
  bool padded_pool, shuffle;
  int num_splits;
};

class AttentionDecodePaged : public ::testing::TestWithParam<PagedCase> {};

TEST_P(AttentionDecodePaged, EqualsReferenceOverContiguousCache) {
  const PagedCase c = GetParam();
  PagedFixture f(c.dtype, {37, 0, 64, 1, 300}, 16, c.padded_pool, c.shuffle,
                 500 + static_cast<uint64_t>(c.sq));
  const int64_t Hq = 4;
  Tensor q = make_input({f.B, c.sq, Hq, f.D}, c.dtype, 501, 0);
  Tensor out = Tensor::empty({f.B, c.sq, Hq, f.Dv}, c.dtype);
  Tensor lse = Tensor::empty({f.B, Hq, c.sq}, DType::kFloat32);
  ops::AttentionOptions o;
  o.causal = true;
  ops::attention_decode_paged(q, f.cache(), out, lse, o, {.num_splits = c.num_splits});
  for (int64_t b = 0; b < f.B; ++b) {
    const int64_t len = f.lens[static_cast<size_t>(b)];
    ops::AttentionOptions ob = o;
    ob.q_offset = len - c.sq;
    auto ref = kernels::cpu::reference_attention_forward(
        q.view().slice(0, b, 1), f.k_contig.view().slice(0, b, 1).slice(1, 0, len),
        f.v_contig.view().slice(0, b, 1).slice(1, 0, len), ob);
    const std::string what = "batch " + std::to_string(b) + " (len " + std::to_string(len) + ")";
    expect_close(out.view().slice(0, b, 1), ref.out, tolerance(c.dtype), what + " out");
    expect_close(lse.view().slice(0, b, 1), ref.lse, 1e-5, what + " lse");
  }
}

std::vector<PagedCase> paged_cases() {
  std::vector<PagedCase> v;
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
    for (int64_t sq : {1, 3})
      for (bool padded : {false, true})
        for (bool shuffle : {false, true})
          for (int splits : {0, 1, 4}) v.push_back({dt, sq, padded, shuffle, splits});
  return v;
}

INSTANTIATE_TEST_SUITE_P(All, AttentionDecodePaged, ::testing::ValuesIn(paged_cases()),
                         [](const ::testing::TestParamInfo<PagedCase>& i) {
                           return std::string(dtype_name(i.param.dtype)) + "_q" +
                                  std::to_string(i.param.sq) +
                                  (i.param.padded_pool ? "_padded" : "_packed") +
                                  (i.param.shuffle ? "_shuffled" : "_ordered") + "_s" +
                                  std::to_string(i.param.num_splits);
                         });

TEST(AttentionDecodePaged, SlidingWindowMatchesReference) {
  PagedFixture f(DType::kFloat16, {37, 130, 75}, 16, false, true, 90);
  const int64_t Hq = 4, Sq = 3;
  Tensor q = make_input({f.B, Sq, Hq, f.D}, DType::kFloat16, 91, 0);
  for (int64_t wl : {0, 5, 20, 100})
    for (int splits : {0, 2}) {
      ops::AttentionOptions o;
      o.causal = true;
      o.window_left = wl;
      Tensor out = Tensor::empty({f.B, Sq, Hq, f.Dv}, DType::kFloat16);
      Tensor lse = Tensor::empty({f.B, Hq, Sq}, DType::kFloat32);
      ops::attention_decode_paged(q, f.cache(), out, lse, o, {.num_splits = splits});
      for (int64_t b = 0; b < f.B; ++b) {
        const int64_t len = f.lens[static_cast<size_t>(b)];
        ops::AttentionOptions ob = o;
        ob.q_offset = len - Sq;
        auto ref = kernels::cpu::reference_attention_forward(
            q.view().slice(0, b, 1), f.k_contig.view().slice(0, b, 1).slice(1, 0, len),
            f.v_contig.view().slice(0, b, 1).slice(1, 0, len), ob);
        const std::string what = "window " + std::to_string(wl) + " batch " + std::to_string(b);
        expect_close(out.view().slice(0, b, 1), ref.out, tolerance(DType::kFloat16), what);
        expect_close(lse.view().slice(0, b, 1), ref.lse, 1e-5, what + " lse");
      }
    }
}

TEST(AttentionDecodePaged, EqualsContiguousDecodeForEqualLengths) {
  PagedFixture f(DType::kFloat32, {200, 200}, 32, false, true, 77);
  const int64_t Hq = 6, Sq = 2;
  Tensor q = make_input({f.B, Sq, Hq, f.D}, DType::kFloat32, 78, 0);
  Tensor out_p = Tensor::empty({f.B, Sq, Hq, f.Dv}, DType::kFloat32);
  Tensor lse_p = Tensor::empty({f.B, Hq, Sq}, DType::kFloat32);
  Tensor out_c = Tensor::empty({f.B, Sq, Hq, f.Dv}, DType::kFloat32);
  Tensor lse_c = Tensor::empty({f.B, Hq, Sq}, DType::kFloat32);
  ops::AttentionOptions o;
  o.causal = true;
  ops::attention_decode_paged(q, f.cache(), out_p, lse_p, o);
  o.q_offset = 200 - Sq;
  ops::attention_decode(q, f.k_contig.view().slice(1, 0, 200), f.v_contig.view().slice(1, 0, 200),
                        out_c, lse_c, o);
  auto ref = kernels::cpu::reference_attention_forward(q, f.k_contig.view().slice(1, 0, 200),
                                                       f.v_contig.view().slice(1, 0, 200), o);
  expect_close(out_p, ref.out, 1e-5, "paged out");
  expect_close(out_c, ref.out, 1e-5, "contiguous out");
  expect_close(lse_p, ref.lse, 1e-5, "paged lse");
  expect_close(lse_c, ref.lse, 1e-5, "contiguous lse");
}

TEST(AttentionDecodePaged, RejectsBadPageIdsAndLengths) {
  PagedFixture f(DType::kFloat32, {20, 5}, 16, false, false, 79);
  Tensor q = make_input({f.B, 1, 2, f.D}, DType::kFloat32, 80, 0);
  Tensor out = Tensor::empty({f.B, 1, 2, f.Dv}, DType::kFloat32);
  Tensor lse = Tensor::empty({f.B, 2, 1}, DType::kFloat32);
  f.page_table.data_as<int32_t>()[1] = 999;
  try {
    ops::attention_decode_paged(q, f.cache(), out, lse);
    FAIL() << "a page id beyond the pool must be rejected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("page_table[0, 1] = 999"), std::string::npos) << e.what();
  }
  f.page_table.data_as<int32_t>()[1] = 1;
  f.seq_lens.data_as<int32_t>()[1] = 33;  // > max_pages * page_size = 32
  EXPECT_THROW(ops::attention_decode_paged(q, f.cache(), out, lse), Error);
  f.seq_lens.data_as<int32_t>()[1] = 5;
  ops::AttentionOptions o;
  o.q_offset = 3;
  EXPECT_THROW(ops::attention_decode_paged(q, f.cache(), out, lse, o), Error);
}

// Strategies hand Communicator::progress to the kernels; the contract is: called from one
// thread, never concurrently, also when decode runs its chunks on several threads.
struct ProgressLog {
  std::mutex mu;
  std::set<std::thread::id> threads;
  std::atomic<int> calls{0}, inside{0}, overlaps{0};
  static void hook(void* ctx) {
    auto* log = static_cast<ProgressLog*>(ctx);
    if (log->inside.fetch_add(1) != 0) log->overlaps.fetch_add(1);
    {
      std::lock_guard<std::mutex> lock(log->mu);
      log->threads.insert(std::this_thread::get_id());
    }
    log->calls.fetch_add(1);
    log->inside.fetch_sub(1);
  }
};

TEST(AttentionDecode, ProgressHookRunsOnOneThreadOnly) {
  const int64_t B = 2, Sk = 4096, Hq = 4, Hkv = 2, D = 64;
  Tensor q = make_input({B, 1, Hq, D}, DType::kFloat32, 30, 0);
  Tensor k = make_input({B, Sk, Hkv, D}, DType::kFloat32, 30, 1);
  Tensor v = make_input({B, Sk, Hkv, D}, DType::kFloat32, 30, 2);
  Tensor out = Tensor::empty({B, 1, Hq, D}, DType::kFloat32);
  Tensor lse = Tensor::empty({B, Hq, 1}, DType::kFloat32);
  PagedFixture f(DType::kFloat32, {700, 1500}, 16, false, true, 31);
  Tensor qp = make_input({f.B, 1, Hq, f.D}, DType::kFloat32, 32, 0);
  Tensor outp = Tensor::empty({f.B, 1, Hq, f.Dv}, DType::kFloat32);
  Tensor lsep = Tensor::empty({f.B, Hq, 1}, DType::kFloat32);
  for (int threads : {omp_get_max_threads(), 1}) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    ProgressLog log;
    ops::AttentionOptions o;
    o.progress = &ProgressLog::hook;
    o.progress_ctx = &log;
    ops::attention_decode(q, k, v, out, lse, o, {.num_splits = 8});
    ops::attention_decode_paged(qp, f.cache(), outp, lsep, o, {.num_splits = 4});
    omp_set_num_threads(saved);
    EXPECT_EQ(log.overlaps.load(), 0) << threads << " threads";
    EXPECT_LE(log.threads.size(), 1u) << threads << " threads";
    if (threads == 1) EXPECT_GT(log.calls.load(), 0) << "a lone thread must drive progress";
    auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
    expect_close(out, ref.out, 1e-5, "out with progress hook");
  }
}

}  // namespace
}  // namespace distattn::testing
