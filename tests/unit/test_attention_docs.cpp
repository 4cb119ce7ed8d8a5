// The local ops with packed documents (cu_seqlens, separate cu_seqlens_k), sink tokens and
// learned sinks, forward, backward (dsinks too) and decode, against the fp64 reference on
// every CPU instruction set this machine has; the learned-sink primitives on their own; and
// the errors for bad cu_seqlens / sinks.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/ops/attention.h"
#include "kernels/cpu/flash_cpu.h"
#include "kernels/cpu/reference.h"

namespace distattn::testing {
namespace {

struct Case {
  std::vector<int32_t> cu, cu_k;  // cu empty: one sequence
  int64_t sq = 0, sk = 0;         // without cu
  bool causal = true;
  int64_t wl = -1, wr = -1, sink_tokens = 0;
  bool sinks = false;
  DType dtype = DType::kFloat32;
  int64_t hq = 4, hkv = 2, d = 64;
};

std::string describe(const Case& c) {
  std::string cu;
  for (int32_t x : c.cu) cu += std::to_string(x) + " ";
  return "cu=[" + cu + "] causal=" + std::to_string(c.causal) + " window=" + std::to_string(c.wl) +
         "," + std::to_string(c.wr) + " sink_tokens=" + std::to_string(c.sink_tokens) +
         " sinks=" + std::to_string(c.sinks) + " " + dtype_name(c.dtype) +
         " isa=" + kernels::cpu::cpu_kernel_isa_name(kernels::cpu::active_cpu_kernel_isa());
}

void expect_close(const char* what, const Case& c, const TensorView& got, const Tensor& ref,
                  double tol) {
  const std::vector<double> g = to_double_vector(got);
  std::vector<double> r(ref.data_as<double>(), ref.data_as<double>() + ref.numel());
  // -inf entries (lse of fully masked rows) must match exactly; compare the rest.
  std::vector<double> a, b;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::isinf(r[i]) || std::isinf(g[i])) {
      EXPECT_EQ(r[i], g[i]) << what << "[" << i << "]: " << describe(c);
      continue;
    }
    a.push_back(g[i]);
    b.push_back(r[i]);
  }
  const auto st = compare(a, b);
  EXPECT_EQ(st.non_finite, 0) << what << ": " << describe(c);
  EXPECT_LE(st.rel(), tol) << what << " max_abs_err " << st.max_abs_err << ": " << describe(c);
}

void run(const Case& c, bool decode = false) {
  const int64_t sq = c.cu.empty() ? c.sq : c.cu.back();
  const int64_t sk = c.cu.empty() ? c.sk : (c.cu_k.empty() ? sq : c.cu_k.back());
  Tensor q = Tensor::empty({1, sq, c.hq, c.d}, c.dtype);
  Tensor k = Tensor::empty({1, sk, c.hkv, c.d}, c.dtype);
  Tensor v = Tensor::empty({1, sk, c.hkv, c.d}, c.dtype);
  Tensor dout = Tensor::empty({1, sq, c.hq, c.d}, c.dtype);
  fill_test_data(q.view(), 21, 1);
  fill_test_data(k.view(), 21, 2);
  fill_test_data(v.view(), 21, 3);
  fill_test_data(dout.view(), 21, 4);
  Tensor sinks = Tensor::empty({c.hq}, DType::kFloat32);
  for (int64_t h = 0; h < c.hq; ++h)
    sinks.data_as<float>()[h] = 0.4f * static_cast<float>(h) - 1.0f;
  ops::AttentionOptions o;
  o.causal = c.causal;
  o.cu_seqlens = c.cu;
  o.cu_seqlens_k = c.cu_k;
  o.window_left = c.wl;
  o.window_right = c.wr;
  o.sink_tokens = c.sink_tokens;
  if (c.cu.empty() && c.causal) o.q_offset = sk - sq;
  if (c.sinks) o.sinks = sinks.view();
  const auto ref = kernels::cpu::reference_attention_forward(q.view(), k.view(), v.view(), o);
  Tensor out = Tensor::empty({1, sq, c.hq, c.d}, c.dtype);
  Tensor lse = Tensor::empty({1, c.hq, sq}, DType::kFloat32);
  const double tol = c.dtype == DType::kFloat32 ? 1e-5 : 2e-2;
  if (decode) {
    ops::attention_decode(q.view(), k.view(), v.view(), out.view(), lse.view(), o);
  } else {
    ops::attention_forward(q.view(), k.view(), v.view(), out.view(), lse.view(), o);
  }
  expect_close("out", c, out.view(), ref.out, tol);
  expect_close("lse", c, lse.view(), ref.lse, tol);
  if (decode) return;
  const auto rb =
      kernels::cpu::reference_attention_backward(q.view(), k.view(), v.view(), dout.view(), o);
  Tensor dq = Tensor::empty({1, sq, c.hq, c.d}, c.dtype);
  Tensor dk = Tensor::empty({1, sk, c.hkv, c.d}, c.dtype);
  Tensor dv = Tensor::empty({1, sk, c.hkv, c.d}, c.dtype);
  Tensor dsinks = Tensor::empty({c.hq}, DType::kFloat32);
  ops::BackwardOptions bo;
  if (c.sinks) bo.dsinks = dsinks.view();
  ops::attention_backward(q.view(), k.view(), v.view(), out.view(), dout.view(), lse.view(),
                          dq.view(), dk.view(), dv.view(), o, bo);
  const double gtol = c.dtype == DType::kFloat32 ? 2e-5 : 3e-2;
  expect_close("dq", c, dq.view(), rb.dq, gtol);
  expect_close("dk", c, dk.view(), rb.dk, gtol);
  expect_close("dv", c, dv.view(), rb.dv, gtol);
  if (c.sinks) expect_close("dsinks", c, dsinks.view(), rb.dsinks, gtol);
}

class DocsAllIsas : public ::testing::TestWithParam<kernels::cpu::CpuKernelIsa> {
 protected:
  void SetUp() override {
    if (!kernels::cpu::cpu_kernel_isa_available(GetParam()))
      GTEST_SKIP() << kernels::cpu::cpu_kernel_isa_name(GetParam()) << " not available here";
    kernels::cpu::set_cpu_kernel_isa(GetParam());
  }
  void TearDown() override { kernels::cpu::set_cpu_kernel_isa(kernels::cpu::CpuKernelIsa::kAuto); }
};

const std::vector<int32_t> kDocs = {0, 1, 8, 21, 22, 61, 64, 131};

TEST_P(DocsAllIsas, PackedDocumentsCausalAndFull) {
  run({.cu = kDocs});
  run({.cu = kDocs, .causal = false});
  run({.cu = kDocs, .dtype = DType::kBFloat16, .hq = 4, .hkv = 4, .d = 128});
}

TEST_P(DocsAllIsas, WindowsAndSinkTokens) {
  for (int64_t w : {int64_t{0}, int64_t{1}, int64_t{17}, int64_t{1000}})
    run({.cu = kDocs, .wl = w, .wr = 0});
  run({.cu = kDocs, .causal = false, .wl = 4, .wr = 6});
  run({.cu = kDocs, .sink_tokens = 3});
  run({.cu = kDocs, .wl = 5, .wr = 0, .sink_tokens = 2});
  run({.sq = 77, .sk = 77, .wl = 9, .wr = 0, .sink_tokens = 4});
}

TEST_P(DocsAllIsas, LearnedSinks) {
  run({.cu = kDocs, .sinks = true});
  run({.cu = kDocs, .wl = 3, .wr = 0, .sink_tokens = 1, .sinks = true});
  run({.sq = 50, .sk = 50, .causal = false, .sinks = true});
  run({.cu = kDocs, .sinks = true, .dtype = DType::kBFloat16});
}

TEST_P(DocsAllIsas, CrossDocumentsAndDecode) {
  // Two queries per document over that document's keys (bottom-right aligned).
  run({.cu = {0, 2, 4, 6}, .cu_k = {0, 9, 30, 31}, .wl = 6, .wr = 0, .sinks = true}, true);
  run({.cu = {0, 2, 4, 6}, .cu_k = {0, 9, 30, 31}, .causal = false});
  run({.sq = 3, .sk = 200, .wl = 40, .wr = 0, .sink_tokens = 4, .sinks = true}, true);
}

INSTANTIATE_TEST_SUITE_P(
    Isas, DocsAllIsas,
    ::testing::Values(kernels::cpu::CpuKernelIsa::kPortable, kernels::cpu::CpuKernelIsa::kAvx2,
                      kernels::cpu::CpuKernelIsa::kAvx512, kernels::cpu::CpuKernelIsa::kAvx512Bf16,
                      kernels::cpu::CpuKernelIsa::kAmx),
    [](const auto& i) { return std::string(kernels::cpu::cpu_kernel_isa_name(i.param)); });

TEST(AttentionDocs, FullyMaskedRowsWithSinksGetTheSinkLogit) {
  Tensor out = Tensor::empty({1, 2, 2, 4}, DType::kFloat32);
  Tensor lse = Tensor::empty({1, 2, 2}, DType::kFloat32);
  Tensor sinks = Tensor::empty({2}, DType::kFloat32);
  for (int i = 0; i < 16; ++i) out.data_as<float>()[i] = 1.0f;
  lse.data_as<float>()[0] = -std::numeric_limits<float>::infinity();
  lse.data_as<float>()[1] = 0.0f;
  lse.data_as<float>()[2] = -std::numeric_limits<float>::infinity();
  lse.data_as<float>()[3] = 0.0f;
  sinks.data_as<float>()[0] = 0.0f;
  sinks.data_as<float>()[1] = 2.0f;
  ops::attention_apply_sinks(out.view(), lse.view(), sinks.view());
  EXPECT_EQ(lse.data_as<float>()[0], 0.0f);                  // row 0 head 0: the sink
  EXPECT_FLOAT_EQ(lse.data_as<float>()[1], std::log(2.0f));  // row 1 head 0
  EXPECT_EQ(out.data_as<float>()[0], 0.0f);                  // out row 0 head 0
  EXPECT_FLOAT_EQ(out.data_as<float>()[8], 0.5f);            // row 1 head 0: halved
  EXPECT_EQ(lse.data_as<float>()[2], 2.0f);                  // row 0 head 1
  EXPECT_FLOAT_EQ(lse.data_as<float>()[3], std::log(1.0f + std::exp(2.0f)));
}

TEST(AttentionDocs, NegativeKeyPositionsAreSinksOnlyWithSinkTokens) {
  // Found by fuzz_attention (fuzz/regressions/fuzz_attention/negative_key_not_a_sink): a key
  // that k_offset puts at a negative position was a "sink" in the fp64 reference even with
  // sink_tokens = 0. Query at position 100, keys at -2..1, window (6, unlimited): with
  // sink_tokens 0 no key is visible (out 0, lse -inf); with sink_tokens 1 the keys below
  // position 1 (-2, -1, 0) ignore the window, as the kernels' pieces split them.
  Tensor q = Tensor::empty({1, 1, 1, 8}, DType::kFloat32);
  Tensor k = Tensor::empty({1, 4, 1, 8}, DType::kFloat32);
  Tensor v = Tensor::empty({1, 4, 1, 8}, DType::kFloat32);
  fill_test_data(q.view(), 7, 1);
  fill_test_data(k.view(), 7, 2);
  fill_test_data(v.view(), 7, 3);
  for (int64_t sink : {0, 1}) {
    ops::AttentionOptions o;
    o.q_offset = 100;
    o.k_offset = -2;
    o.window_left = 6;
    o.sink_tokens = sink;
    const auto ref = kernels::cpu::reference_attention_forward(q.view(), k.view(), v.view(), o);
    Tensor out = Tensor::empty({1, 1, 1, 8}, DType::kFloat32);
    Tensor lse = Tensor::empty({1, 1, 1}, DType::kFloat32);
    ops::attention_forward(q.view(), k.view(), v.view(), out.view(), lse.view(), o);
    const double r_lse = ref.lse.data_as<double>()[0];
    if (sink == 0) {
      EXPECT_TRUE(std::isinf(r_lse) && r_lse < 0) << "reference lse " << r_lse;
      EXPECT_EQ(ref.out.data_as<double>()[0], 0.0);
    } else {
      EXPECT_TRUE(std::isfinite(r_lse));
    }
    EXPECT_EQ(std::isinf(lse.data_as<float>()[0]), std::isinf(r_lse)) << "sink " << sink;
    for (int i = 0; i < 8; ++i)
      EXPECT_NEAR(out.data_as<float>()[i], ref.out.data_as<double>()[i], 1e-5)
          << "sink " << sink << " i " << i;
  }
}

TEST(AttentionDocs, BadArgumentsNameTheField) {
  Tensor q = Tensor::zeros({1, 10, 2, 64}, DType::kFloat32);
  Tensor out = Tensor::empty({1, 10, 2, 64}, DType::kFloat32);
  Tensor lse = Tensor::empty({1, 2, 10}, DType::kFloat32);
  auto message = [&](const ops::AttentionOptions& o) -> std::string {
    try {
      ops::attention_forward(q.view(), q.view(), q.view(), out.view(), lse.view(), o);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  const std::vector<int32_t> bad_end = {0, 4, 9};
  const std::vector<int32_t> bad_order = {0, 6, 4, 10};
  ops::AttentionOptions o;
  o.cu_seqlens = bad_end;
  EXPECT_NE(message(o).find("cu_seqlens[2] = 9"), std::string::npos) << message(o);
  o.cu_seqlens = bad_order;
  EXPECT_NE(message(o).find("non-decreasing"), std::string::npos) << message(o);
  ops::AttentionOptions s;
  Tensor bad_sinks = Tensor::zeros({3}, DType::kFloat32);
  s.sinks = bad_sinks.view();
  EXPECT_NE(message(s).find("sinks must be fp32 [heads_q = 2]"), std::string::npos) << message(s);
  ops::AttentionOptions n;
  n.sink_tokens = -1;
  EXPECT_NE(message(n).find("sink_tokens"), std::string::npos) << message(n);
}

}  // namespace
}  // namespace distattn::testing
