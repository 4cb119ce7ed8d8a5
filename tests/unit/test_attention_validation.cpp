// Every attention entry point rejects bad input with distattn::Error(kInvalidArgument) whose
// message names the tensor and says what to change, before any kernel runs.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <string>

#include "tests/unit/attention_test_util.h"

namespace distattn::testing {
namespace {

// Runs fn, expects an Error with `status` whose message contains every fragment.
void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> fragments,
                  Status status = Status::kInvalidArgument) {
  try {
    fn();
    ADD_FAILURE() << "expected distattn::Error containing '" << *fragments.begin() << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    for (const char* f : fragments)
      EXPECT_NE(e.message().find(f), std::string::npos)
          << "message lacks '" << f << "': " << e.message();
  }
}

struct Bundle {
  Tensor q, k, v, out, lse, dout, dq, dk, dv;
  Bundle(DType dt = DType::kFloat32, int64_t B = 2, int64_t Sq = 5, int64_t Sk = 7, int64_t Hq = 4,
         int64_t Hkv = 2, int64_t D = 8, int64_t Dv = 6)
      : q(make_input({B, Sq, Hq, D}, dt, 1, 0)),
        k(make_input({B, Sk, Hkv, D}, dt, 1, 1)),
        v(make_input({B, Sk, Hkv, Dv}, dt, 1, 2)),
        out(Tensor::empty({B, Sq, Hq, Dv}, dt)),
        lse(Tensor::empty({B, Hq, Sq}, DType::kFloat32)),
        dout(make_input({B, Sq, Hq, Dv}, dt, 1, 3)),
        dq(Tensor::empty({B, Sq, Hq, D}, dt)),
        dk(Tensor::empty({B, Sk, Hkv, D}, dt)),
        dv(Tensor::empty({B, Sk, Hkv, Dv}, dt)) {}
};

// Found by fuzz/fuzz_attention (regression input fuzz/regressions/fuzz_attention/offset_overflow):
// a q_offset near 2^63 overflowed the mask's position arithmetic (UBSan) instead of being
// rejected; offsets and windows up to 2^60 still run.
TEST(AttentionValidation, RejectsOffsetsAndWindowsBeyondTwoToThe60) {
  Bundle t;
  ops::AttentionOptions o;
  o.causal = true;
  o.q_offset = int64_t{1} << 62;
  expect_error([&] { ops::attention_forward(t.q, t.k, t.v, t.out, t.lse, o); },
               {"attention_forward", "q_offset", "out of range", "2^60"});
  o.q_offset = 0;
  o.k_offset = -(int64_t{1} << 61);
  expect_error(
      [&] { ops::attention_backward(t.q, t.k, t.v, t.out, t.dout, t.lse, t.dq, t.dk, t.dv, o); },
      {"k_offset", "out of range"});
  o.k_offset = 0;
  o.window_left = std::numeric_limits<int64_t>::max();
  expect_error([&] { ops::attention_forward(t.q, t.k, t.v, t.out, t.lse, o); },
               {"window_left", "out of range"});
  o.window_left = int64_t{1} << 60;
  o.q_offset = int64_t{1} << 60;
  o.k_offset = int64_t{1} << 60;
  ops::attention_forward(t.q, t.k, t.v, t.out, t.lse, o);  // at the bound: runs
}

TEST(AttentionValidation, ForwardRejectsInconsistentShapes) {
  Bundle t;
  expect_error(
      [&] {
        ops::attention_forward(t.q.view().reshape({2, 5, 32}), t.k, t.v, t.out, t.lse);
      },
      {"q must be 4-D", "BSHD"});
  Bundle bad_heads(DType::kFloat32, 2, 5, 7, 3, 2);
  expect_error(
      [&] {
        ops::attention_forward(bad_heads.q, bad_heads.k, bad_heads.v, bad_heads.out, bad_heads.lse);
      },
      {"query heads (3)", "multiple of KV heads (2)"});
  Bundle other_batch(DType::kFloat32, 3);
  expect_error([&] { ops::attention_forward(t.q, other_batch.k, other_batch.v, t.out, t.lse); },
               {"k batch 3", "q batch 2"});
  Bundle other_d(DType::kFloat32, 2, 5, 7, 4, 2, 16);
  expect_error([&] { ops::attention_forward(t.q, other_d.k, t.v, t.out, t.lse); },
               {"k head_dim 16", "q head_dim 8"});
  Bundle other_sk(DType::kFloat32, 2, 5, 9);
  expect_error([&] { ops::attention_forward(t.q, t.k, other_sk.v, t.out, t.lse); },
               {"v dim 1 (9)", "k dim 1 (7)"});
  expect_error([&] { ops::attention_forward(t.q, t.k, t.v, t.dq, t.lse); },
               {"out has shape [2, 5, 4, 8]", "[2, 5, 4, 6]"});
  Tensor lse_t = Tensor::empty({2, 5, 4}, DType::kFloat32);
  expect_error([&] { ops::attention_forward(t.q, t.k, t.v, t.out, lse_t); },
               {"lse has shape [2, 5, 4]", "[2, 4, 5]"});
}

TEST(AttentionValidation, ForwardRejectsDtypeMixesAndLayouts) {
  Bundle f32, b16(DType::kBFloat16), f16(DType::kFloat16);
  expect_error([&] { ops::attention_forward(b16.q, f32.k, f32.v, b16.out, b16.lse); },
               {"share one dtype", "q bf16", "k fp32"});
  expect_error([&] { ops::attention_forward(b16.q, b16.k, b16.v, f16.out, b16.lse); },
               {"out is fp16", "q's dtype (bf16) or fp32"});
  ops::attention_forward(b16.q, b16.k, b16.v, f32.out, b16.lse);  // fp32 partial: allowed
  Tensor lse16 = Tensor::empty({2, 4, 5}, DType::kBFloat16);
  expect_error([&] { ops::attention_forward(f32.q, f32.k, f32.v, f32.out, lse16); },
               {"lse must be fp32"});
  Tensor qd = Tensor::empty({2, 5, 4, 8}, DType::kFloat64);
  expect_error([&] { ops::attention_forward(qd, qd, qd, qd, f32.lse); },
               {"q is fp64", "fp32, bf16, fp16"});
  // Last dim not contiguous: a transposed view.
  const int64_t shape[4] = {2, 5, 4, 8}, strides[4] = {160, 32, 1, 4};
  TensorView qt(f32.q.data(), DType::kFloat32, Device::cpu(), shape, strides);
  expect_error([&] { ops::attention_forward(qt, f32.k, f32.v, f32.out, f32.lse); },
               {"q fp32[2, 5, 4, 8] on cpu must be contiguous in its last dim"});
  TensorView null_q = f32.q.view();
  null_q.data = nullptr;
  expect_error([&] { ops::attention_forward(null_q, f32.k, f32.v, f32.out, f32.lse); },
               {"q has a null data pointer"});
  ops::AttentionOptions o;
  o.softmax_scale = std::numeric_limits<float>::infinity();
  expect_error([&] { ops::attention_forward(f32.q, f32.k, f32.v, f32.out, f32.lse, o); },
               {"softmax_scale must be finite"});
}

TEST(AttentionValidation, DevicesMustMatchAndCudaIsReportedUnsupported) {
  Bundle t;
  TensorView kc = t.k.view();
  kc.device = Device::cuda(0);
  expect_error([&] { ops::attention_forward(t.q, kc, t.v, t.out, t.lse); },
               {"k is on cuda:0 but q is on cpu"});
  // All-CUDA views (host memory in disguise: never run them through real CUDA kernels) are
  // valid requests a CPU-only build must refuse before touching data.
  if (built_with_cuda()) return;
  TensorView qc = t.q.view(), vc = t.v.view(), oc = t.out.view(), lc = t.lse.view();
  qc.device = vc.device = oc.device = lc.device = Device::cuda(0);
  expect_error([&] { ops::attention_forward(qc, kc, vc, oc, lc); },
               {"CUDA tensors need a build with CUDA kernels"}, Status::kUnsupported);
}

TEST(AttentionValidation, BackwardChecksEveryGradient) {
  Bundle t;
  expect_error(
      [&] { ops::attention_backward(t.q, t.k, t.v, t.out, t.dout, t.lse, t.dq, t.dv, t.dv); },
      {"dk has shape [2, 7, 2, 6] but must be [2, 7, 2, 8]"});
  expect_error(
      [&] { ops::attention_backward(t.q, t.k, t.v, t.out, t.dq, t.lse, t.dq, t.dk, t.dv); },
      {"dout has shape"});
  Bundle h(DType::kFloat16);
  expect_error(
      [&] { ops::attention_backward(t.q, t.k, t.v, t.out, t.dout, t.lse, h.dq, t.dk, t.dv); },
      {"dq is fp16", "q's dtype (fp32)"});
}

TEST(AttentionValidation, MergeAndDecodeChecks) {
  Bundle t;
  Tensor o16 = Tensor::empty({2, 5, 4, 6}, DType::kBFloat16);
  expect_error([&] { ops::attention_merge(t.out, t.lse, o16, t.lse, t.out, t.lse); },
               {"out_b must be fp32"});
  Tensor lse_bad = Tensor::empty({2, 4, 6}, DType::kFloat32);
  expect_error([&] { ops::attention_merge(t.out, t.lse, t.out, lse_bad, t.out, t.lse); },
               {"lse_b has shape [2, 4, 6]", "[2, 4, 5]"});
  Bundle longq(DType::kFloat32, 1, 17, 30);
  expect_error([&] { ops::attention_decode(longq.q, longq.k, longq.v, longq.out, longq.lse); },
               {"at most 16 queries", "use attention_forward"});
  expect_error([&] { ops::attention_decode(t.q, t.k, t.v, t.out, t.lse, {}, {.num_splits = -1}); },
               {"num_splits must be >= 0"});
}

TEST(AttentionValidation, PagedCacheChecks) {
  const int64_t B = 2, Hq = 4, Hkv = 2, D = 8, P = 6, ps = 4;
  Tensor q = make_input({B, 1, Hq, D}, DType::kFloat32, 2, 0);
  Tensor kp = make_input({P, ps, Hkv, D}, DType::kFloat32, 2, 1);
  Tensor vp = make_input({P, ps, Hkv, D}, DType::kFloat32, 2, 2);
  Tensor out = Tensor::empty({B, 1, Hq, D}, DType::kFloat32);
  Tensor lse = Tensor::empty({B, Hq, 1}, DType::kFloat32);
  Tensor pt = Tensor::zeros({B, 3}, DType::kInt32), pt64 = Tensor::zeros({B, 3}, DType::kInt64);
  Tensor sl = Tensor::zeros({B}, DType::kInt32), sl_short = Tensor::zeros({1}, DType::kInt32);
  expect_error(
      [&] {
        ops::attention_decode_paged(q, {kp, vp, pt64, sl}, out, lse);
      },
      {"page_table must be int32"});
  expect_error(
      [&] {
        ops::attention_decode_paged(q, {kp, vp, pt, sl_short}, out, lse);
      },
      {"seq_lens must be 1-D [batch] with batch 2"});
  Tensor vp_bad = make_input({P + 1, ps, Hkv, D}, DType::kFloat32, 2, 2);
  expect_error(
      [&] {
        ops::attention_decode_paged(q, {kp, vp_bad, pt, sl}, out, lse);
      },
      {"v_pages has 7 pages but k_pages has 6"});
  ops::attention_decode_paged(q, {kp, vp, pt, sl}, out, lse);  // all-empty sequences: valid
  for (int64_t i = 0; i < lse.numel(); ++i)
    EXPECT_EQ(lse.data_as<float>()[i], -std::numeric_limits<float>::infinity());
}

}  // namespace
}  // namespace distattn::testing
