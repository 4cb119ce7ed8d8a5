// attention_backward (the CPU flash backward behind the ops dispatch) against the fp64
// reference gradients: dtypes x masks x odd sizes, GQA group sums, accumulate=true, key-block
// decomposition (ring backward), strided views and fully masked rows.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <tuple>

#include "tests/unit/attention_test_util.h"

namespace distattn::testing {
namespace {

struct Config {
  const char* name;
  bool causal;
  int64_t hq, hkv;
  int64_t window_left, window_right;
  bool keys_after;  // q_offset/k_offset such that the first rows see no key
};

const Config kConfigs[] = {
    {"full", false, 2, 2, -1, -1, false},
    {"causal", true, 2, 2, -1, -1, false},
    {"causal_keys_after", true, 2, 2, -1, -1, true},
    {"window", false, 2, 2, 12, 3, false},
    {"gqa", true, 4, 2, -1, -1, false},
    {"mqa_window", true, 3, 1, 20, -1, false},
};

const std::pair<int64_t, int64_t> kSizes[] = {{1, 1}, {7, 7}, {131, 131}, {257, 257}, {7, 131}};

ops::AttentionOptions options_for(const Config& c, int64_t sq, int64_t sk) {
  ops::AttentionOptions o;
  o.causal = c.causal;
  o.window_left = c.window_left;
  o.window_right = c.window_right;
  if (c.keys_after) {
    o.q_offset = 50;
    o.k_offset = 50 + sq / 2;
  } else {
    o.q_offset = sk - sq;
  }
  return o;
}

// Backward error bound: the tensors out/lse fed to the backward come from the (rounded)
// forward, and dS = P (dP - rowsum(dO * O)) amplifies out's storage rounding; fp32 gradients
// sum Sk (or Sq) products, so their bound is 2x the forward's.
double grad_tolerance(DType t) {
  return t == DType::kFloat32 ? 2e-5 : tolerance(t);
}

using Param = std::tuple<DType, int, int>;
class AttentionBackwardSweep : public ::testing::TestWithParam<Param> {};

TEST_P(AttentionBackwardSweep, MatchesReference) {
  const auto [dtype, ci, si] = GetParam();
  const Config& c = kConfigs[ci];
  const auto [sq, sk] = kSizes[si];
  const int64_t B = 1, D = 64, Dv = 64;
  const uint64_t seed = 300 + static_cast<uint64_t>(ci * 10 + si);
  Tensor q = make_input({B, sq, c.hq, D}, dtype, seed, 0);
  Tensor k = make_input({B, sk, c.hkv, D}, dtype, seed, 1);
  Tensor v = make_input({B, sk, c.hkv, Dv}, dtype, seed, 2);
  Tensor dout = make_input({B, sq, c.hq, Dv}, dtype, seed, 3);
  Tensor out = Tensor::empty({B, sq, c.hq, Dv}, dtype);
  Tensor lse = Tensor::empty({B, c.hq, sq}, DType::kFloat32);
  const ops::AttentionOptions o = options_for(c, sq, sk);
  ops::attention_forward(q, k, v, out, lse, o);
  Tensor dq = make_input({B, sq, c.hq, D}, dtype, seed, 4);  // garbage: overwritten
  Tensor dk = make_input({B, sk, c.hkv, D}, dtype, seed, 5);
  Tensor dv = make_input({B, sk, c.hkv, Dv}, dtype, seed, 6);
  ops::attention_backward(q, k, v, out, dout, lse, dq, dk, dv, o);
  auto ref = kernels::cpu::reference_attention_backward(q, k, v, dout, o);
  // dq and dk cancel exactly (dS = P (dP - rowsum(P dP))) when each row sees one key; dv
  // (= sum P dout, no cancellation) sets the scale of their roundoff.
  const double floor = compare(std::vector<double>(ref.dv.numel(), 0.0), as_vector(ref.dv)).max_ref;
  expect_close(dq, ref.dq, grad_tolerance(dtype), "dq", floor);
  expect_close(dk, ref.dk, grad_tolerance(dtype), "dk", floor);
  expect_close(dv, ref.dv, grad_tolerance(dtype), "dv");
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const auto [dtype, ci, si] = info.param;
  return std::string(dtype_name(dtype)) + "_" + kConfigs[ci].name + "_" +
         std::to_string(kSizes[si].first) + "x" + std::to_string(kSizes[si].second);
}

INSTANTIATE_TEST_SUITE_P(
    All, AttentionBackwardSweep,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                       ::testing::Range(0, static_cast<int>(std::size(kConfigs))),
                       ::testing::Range(0, static_cast<int>(std::size(kSizes)))),
    param_name);

// Ring backward: with the global out/lse, the gradients of two key blocks computed
// separately (accumulate=true for the second) equal the gradients over all keys; fp32
// gradient buffers with bf16 inputs, as strategies use them.
TEST(AttentionBackward, AccumulateOverKeyBlocksEqualsWhole) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    const int64_t B = 2, Sq = 37, Sk = 53, Hq = 4, Hkv = 2, D = 32, Dv = 48, split = 20;
    Tensor q = make_input({B, Sq, Hq, D}, dt, 11, 0);
    Tensor k = make_input({B, Sk, Hkv, D}, dt, 11, 1);
    Tensor v = make_input({B, Sk, Hkv, Dv}, dt, 11, 2);
    Tensor dout = make_input({B, Sq, Hq, Dv}, dt, 11, 3);
    Tensor out = Tensor::empty({B, Sq, Hq, Dv}, DType::kFloat32);
    Tensor lse = Tensor::empty({B, Hq, Sq}, DType::kFloat32);
    ops::AttentionOptions o;
    o.causal = true;
    o.q_offset = Sk - Sq;
    ops::attention_forward(q, k, v, out, lse, o);
    // dk/dv of block 2 start at zero: its call accumulates into them as well as into dq.
    Tensor dq = Tensor::empty({B, Sq, Hq, D}, DType::kFloat32);
    Tensor dk = Tensor::zeros({B, Sk, Hkv, D}, DType::kFloat32);
    Tensor dv = Tensor::zeros({B, Sk, Hkv, Dv}, DType::kFloat32);
    // Block 1: keys [0, split) overwrite dq and their part of dk/dv.
    ops::attention_backward(q, k.view().slice(1, 0, split), v.view().slice(1, 0, split), out, dout,
                            lse, dq, dk.view().slice(1, 0, split), dv.view().slice(1, 0, split), o);
    // Block 2: keys [split, Sk) with shifted k_offset add into dq.
    ops::AttentionOptions o2 = o;
    o2.k_offset = split;
    ops::attention_backward(q, k.view().slice(1, split, Sk - split),
                            v.view().slice(1, split, Sk - split), out, dout, lse, dq,
                            dk.view().slice(1, split, Sk - split),
                            dv.view().slice(1, split, Sk - split), o2, {.accumulate = true});
    auto ref = kernels::cpu::reference_attention_backward(q, k, v, dout, o);
    expect_close(dq, ref.dq, 2e-5, std::string(dtype_name(dt)) + " dq");
    expect_close(dk, ref.dk, 2e-5, std::string(dtype_name(dt)) + " dk");
    expect_close(dv, ref.dv, 2e-5, std::string(dtype_name(dt)) + " dv");
    // accumulate=true onto existing values adds exactly the gradient.
    Tensor dq2 = Tensor::empty({B, Sq, Hq, D}, DType::kFloat32);
    Tensor dk2 = Tensor::empty({B, Sk, Hkv, D}, DType::kFloat32);
    Tensor dv2 = Tensor::empty({B, Sk, Hkv, Dv}, DType::kFloat32);
    for (const Tensor* t : {&dq2, &dk2, &dv2})
      for (int64_t i = 0; i < t->numel(); ++i) t->data_as<float>()[i] = 1.5f;
    ops::attention_backward(q, k, v, out, dout, lse, dq2, dk2, dv2, o, {.accumulate = true});
    Tensor shifted = Tensor::empty({B, Sq, Hq, D}, DType::kFloat64);
    for (int64_t i = 0; i < shifted.numel(); ++i)
      shifted.data_as<double>()[i] = ref.dq.data_as<double>()[i] + 1.5;
    expect_close(dq2, shifted, 2e-5, "accumulated dq");
  }
}

TEST(AttentionBackward, StridedViewsAndFullyMaskedRows) {
  const DType dt = DType::kFloat32;
  const int64_t B = 1, Sq = 12, Sk = 9, Hq = 2, Hkv = 1, D = 16, Dv = 8;
  Tensor q = make_input({B, Sq, Hq, D}, dt, 12, 0);
  Tensor k = make_input({B, Sk, Hkv, D}, dt, 12, 1);
  Tensor v = make_input({B, Sk, Hkv, Dv}, dt, 12, 2);
  Tensor dout = make_input({B, Sq, Hq, Dv}, dt, 12, 3);
  ops::AttentionOptions o;
  o.causal = true;
  o.k_offset = 5;  // rows 0..4 see no key
  Tensor out = Tensor::empty({B, Sq, Hq, Dv}, dt);
  Tensor lse = Tensor::empty({B, Hq, Sq}, DType::kFloat32);
  ops::attention_forward(q, k, v, out, lse, o);
  PaddedTensor qs = make_padded({B, Sq, Hq, D}, dt), ks = make_padded({B, Sk, Hkv, D}, dt);
  PaddedTensor vs = make_padded({B, Sk, Hkv, Dv}, dt), os = make_padded({B, Sq, Hq, Dv}, dt);
  PaddedTensor dos = make_padded({B, Sq, Hq, Dv}, dt), dqs = make_padded({B, Sq, Hq, D}, dt);
  PaddedTensor dks = make_padded({B, Sk, Hkv, D}, dt), dvs = make_padded({B, Sk, Hkv, Dv}, dt);
  copy_into(q, qs.view);
  copy_into(k, ks.view);
  copy_into(v, vs.view);
  copy_into(out, os.view);
  copy_into(dout, dos.view);
  ops::attention_backward(qs.view, ks.view, vs.view, os.view, dos.view, lse, dqs.view, dks.view,
                          dvs.view, o);
  auto ref = kernels::cpu::reference_attention_backward(q, k, v, dout, o);
  expect_close(dqs.view, ref.dq, 2e-5, "dq");
  expect_close(dks.view, ref.dk, 2e-5, "dk");
  expect_close(dvs.view, ref.dv, 2e-5, "dv");
  const std::vector<double> dqv = to_double_vector(dqs.view);
  for (int64_t i = 0; i < 5 * Hq * D; ++i) EXPECT_EQ(dqv[i], 0.0) << "masked row gradient";
}

TEST(AttentionBackward, LargeHeadDims) {
  const DType dt = DType::kFloat32;
  for (auto [D, Dv] : {std::pair<int64_t, int64_t>{128, 128}, {576, 512}}) {
    const int64_t B = 1, Sq = 9, Sk = 21, Hq = 2, Hkv = 1;
    Tensor q = make_input({B, Sq, Hq, D}, dt, 13, 0);
    Tensor k = make_input({B, Sk, Hkv, D}, dt, 13, 1);
    Tensor v = make_input({B, Sk, Hkv, Dv}, dt, 13, 2);
    Tensor dout = make_input({B, Sq, Hq, Dv}, dt, 13, 3);
    Tensor out = Tensor::empty({B, Sq, Hq, Dv}, dt);
    Tensor lse = Tensor::empty({B, Hq, Sq}, DType::kFloat32);
    ops::AttentionOptions o;
    o.causal = true;
    o.q_offset = Sk - Sq;
    ops::attention_forward(q, k, v, out, lse, o);
    Tensor dq = Tensor::empty({B, Sq, Hq, D}, dt), dk = Tensor::empty({B, Sk, Hkv, D}, dt);
    Tensor dv = Tensor::empty({B, Sk, Hkv, Dv}, dt);
    ops::attention_backward(q, k, v, out, dout, lse, dq, dk, dv, o);
    auto ref = kernels::cpu::reference_attention_backward(q, k, v, dout, o);
    expect_close(dq, ref.dq, 2e-5, "dq D=" + std::to_string(D));
    expect_close(dk, ref.dk, 2e-5, "dk D=" + std::to_string(D));
    expect_close(dv, ref.dv, 2e-5, "dv D=" + std::to_string(D));
  }
}

}  // namespace
}  // namespace distattn::testing
