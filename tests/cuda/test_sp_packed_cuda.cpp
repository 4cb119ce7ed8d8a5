// Packed documents, sliding windows, sink tokens and learned sinks on device tensors: the local
// ops (forward, backward with dsinks, decode) and every strategy, against the fp64 reference,
// with work on a user-created non-blocking stream and NaN-poisoned outputs. Device-generic like
// test_sp_cuda: the OnCpu suite runs in CPU-only CI (proving the test logic), OnCuda runs where
// a GPU is lent and skips on every rank alike without one.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/ops/attention.h"
#include "distattn/parallel/sequence_parallel.h"
#include "kernels/cpu/reference.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/sp_device_util.h"

namespace distattn::parallel {
namespace {

using testing::compare;
using testing::fill_test_data;
using testing::poisoned;
using testing::sp_device::device_world;
using testing::sp_device::DeviceWorld;
using testing::sp_device::gpu_usable;
using testing::sp_device::host_world;
using testing::sp_device::UserStream;

struct Group {
  std::unique_ptr<comm::DeviceMesh> mesh;
  SpGroup group;
  SpLayout layout;
  int rank = 0;
};

Group make_group(Strategy s, DeviceWorld& w) {
  Group g;
  const int p = w.comm->size();
  if (s == Strategy::kHybrid) {
    const int u = p % 2 == 0 ? 2 : 1;
    g.mesh = std::make_unique<comm::DeviceMesh>(
        w.comm, comm::DeviceMesh::Axes{{"ring", p / u}, {"ulysses", u}});
    g.group = SpGroup::from_mesh(*g.mesh);
  } else {
    g.group = SpGroup::flat(*w.comm);
  }
  g.layout = g.group.layout(s);
  g.rank = g.group.layout_rank(s);
  return g;
}

struct Case {
  std::vector<int64_t> docs;
  bool causal = true;
  int64_t wl = -1, wr = -1, sink_tokens = 0;
  bool sinks = false;
  DType dtype = DType::kFloat32;
  int64_t hq = 4, hkv = 2, d = 64;
};

std::vector<double> rebuild(const Group& g, const SpShape& sh, ShardRole role,
                            const TensorView& local, std::initializer_list<int64_t> full_shape) {
  Tensor full = Tensor::zeros(full_shape, DType::kFloat64);
  Tensor host = to_device(local, Device::cpu());
  Tensor local64 = Tensor::empty(std::span<const int64_t>(host.view().shape.data(), local.ndim),
                                 DType::kFloat64);
  convert_dtype_cpu(host.view(), local64.view());
  unshard_into(g.layout, sh, g.rank, role, local64.view(), full.view(), /*accumulate=*/true);
  host_world().all_reduce(full.data(), full.data(), static_cast<size_t>(full.numel()),
                          DType::kFloat64, comm::ReduceOp::kSum);
  return std::vector<double>(full.data_as<double>(), full.data_as<double>() + full.numel());
}

void expect_close(const std::string& what, const std::vector<double>& got, const Tensor& ref,
                  double tol) {
  std::vector<double> a, b;
  int64_t inf_mismatch = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double r = ref.data_as<double>()[i];
    if (std::isinf(r) || std::isinf(got[i])) {
      inf_mismatch += std::isinf(r) != std::isinf(got[i]) ? 1 : 0;
      continue;
    }
    a.push_back(got[i]);
    b.push_back(r);
  }
  EXPECT_EQ(inf_mismatch, 0) << what;
  const auto st = compare(a, b);
  EXPECT_EQ(st.non_finite, 0) << what;
  EXPECT_LE(st.rel(), tol) << what << " max_abs_err " << st.max_abs_err;
}

std::vector<int32_t> cu_of(const std::vector<int64_t>& lens) {
  return cu_seqlens_of(lens);
}

void run_strategy_case(Strategy s, DeviceType type, const Case& c) {
  DeviceWorld& w = device_world(type);
  const Device dev = w.device;
  Group g = make_group(s, w);
  const std::vector<int32_t> cu = cu_of(c.docs);
  const int64_t total = cu.back(), dd = c.d;
  SCOPED_TRACE(std::string(strategy_name(s)) + " on " + dev.str() +
               " P=" + std::to_string(w.comm->size()) + " window " + std::to_string(c.wl) +
               " sink_tokens " + std::to_string(c.sink_tokens) + (c.sinks ? " sinks" : "") + " " +
               dtype_name(c.dtype));
  SpShape sh;
  sh.seq = total;
  sh.heads_q = c.hq;
  sh.heads_kv = c.hkv;
  sh.head_dim = dd;
  sh.cu_seqlens = cu;
  sh.min_split_chunk = 1;  // split every document (the split path on these short ones)
  Tensor q = Tensor::empty({1, total, c.hq, dd}, c.dtype);
  Tensor k = Tensor::empty({1, total, c.hkv, dd}, c.dtype);
  Tensor v = Tensor::empty({1, total, c.hkv, dd}, c.dtype);
  Tensor dout = Tensor::empty({1, total, c.hq, dd}, c.dtype);
  fill_test_data(q.view(), 31, 1);
  fill_test_data(k.view(), 31, 2);
  fill_test_data(v.view(), 31, 3);
  fill_test_data(dout.view(), 31, 4);
  Tensor sinks_h = Tensor::empty({c.hq}, DType::kFloat32);
  for (int64_t h = 0; h < c.hq; ++h)
    sinks_h.data_as<float>()[h] = 0.3f * static_cast<float>(h) - 0.4f;
  ops::AttentionOptions ro;
  ro.causal = c.causal;
  ro.cu_seqlens = cu;
  ro.window_left = c.wl;
  ro.window_right = c.wr;
  ro.sink_tokens = c.sink_tokens;
  if (c.sinks) ro.sinks = sinks_h.view();
  const auto ref = kernels::cpu::reference_attention_forward(q.view(), k.view(), v.view(), ro);
  const auto rb =
      kernels::cpu::reference_attention_backward(q.view(), k.view(), v.view(), dout.view(), ro);

  auto local = [&](ShardRole role, const Tensor& full) {
    return to_device(shard(g.layout, sh, g.rank, role, full.view()).view(), dev);
  };
  Tensor ql = local(ShardRole::kQuery, q), kl = local(ShardRole::kKeyValue, k),
         vl = local(ShardRole::kKeyValue, v), dol = local(ShardRole::kQuery, dout);
  const int64_t sl = ql.view().size(1), hl = ql.view().size(2), hkl = kl.view().size(2);
  Tensor out = poisoned({1, sl, hl, dd}, c.dtype, dev);
  Tensor lse = poisoned({1, hl, sl}, DType::kFloat32, dev);
  Tensor sinks = to_device(sinks_h.view(), dev);
  Tensor dsinks = poisoned({c.hq}, DType::kFloat32, dev);
  UserStream stream(dev);
  SpOptions o;
  o.causal = c.causal;
  o.heads_q = c.hq;
  o.heads_kv = c.hkv;
  o.cu_seqlens = cu;
  o.min_split_chunk = 1;
  o.window_left = c.wl;
  o.window_right = c.wr;
  o.sink_tokens = c.sink_tokens;
  o.stream = stream.get();
  if (c.sinks) {
    o.sinks = sinks.view();
    o.dsinks = dsinks.view();
  }
  sp_attention_forward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(), lse.view(), o);
  stream.synchronize();
  const double tol = c.dtype == DType::kFloat32 ? 1e-5 : 2e-2;
  const double gtol = c.dtype == DType::kFloat32 ? 2e-5 : 3e-2;
  expect_close("out", rebuild(g, sh, ShardRole::kQuery, out.view(), {1, total, c.hq, dd}), ref.out,
               tol);
  expect_close("lse", rebuild(g, sh, ShardRole::kLse, lse.view(), {1, c.hq, total}), ref.lse, tol);
  Tensor dq = poisoned({1, sl, hl, dd}, c.dtype, dev);
  Tensor dk = poisoned({1, sl, hkl, dd}, c.dtype, dev);
  Tensor dv = poisoned({1, sl, hkl, dd}, c.dtype, dev);
  sp_attention_backward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(), dol.view(),
                        lse.view(), dq.view(), dk.view(), dv.view(), o);
  stream.synchronize();
  expect_close("dq", rebuild(g, sh, ShardRole::kQuery, dq.view(), {1, total, c.hq, dd}), rb.dq,
               gtol);
  expect_close("dk", rebuild(g, sh, ShardRole::kKeyValue, dk.view(), {1, total, c.hkv, dd}), rb.dk,
               gtol);
  expect_close("dv", rebuild(g, sh, ShardRole::kKeyValue, dv.view(), {1, total, c.hkv, dd}), rb.dv,
               gtol);
  if (c.sinks) {
    const Tensor h = to_device(dsinks.view(), Device::cpu());
    const std::vector<double> got(h.data_as<float>(), h.data_as<float>() + c.hq);
    const std::vector<double> want(rb.dsinks.data_as<double>(), rb.dsinks.data_as<double>() + c.hq);
    EXPECT_LE(compare(got, want).rel(), gtol) << "dsinks";
  }
}

using Param = std::tuple<DeviceType, Strategy>;
class SpPackedOnDevice : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    if (std::get<0>(GetParam()) == DeviceType::kCUDA && !gpu_usable())
      GTEST_SKIP() << "skipped: no GPU on every rank";
  }
};

const std::vector<int64_t> kDocs = {1, 7, 13, 2, 40, 3, 29};

TEST_P(SpPackedOnDevice, PackedDocumentsFp32) {
  run_strategy_case(std::get<1>(GetParam()), std::get<0>(GetParam()), {.docs = kDocs});
}

TEST_P(SpPackedOnDevice, WindowSinkTokensAndSinksBf16HeadDim128) {
  run_strategy_case(std::get<1>(GetParam()), std::get<0>(GetParam()),
                    {.docs = kDocs,
                     .wl = 9,
                     .wr = 0,
                     .sink_tokens = 2,
                     .sinks = true,
                     .dtype = DType::kBFloat16,
                     .hq = 4,
                     .hkv = 4,
                     .d = 128});
}

std::string param_name(const ::testing::TestParamInfo<Param>& i) {
  return std::string(std::get<0>(i.param) == DeviceType::kCUDA ? "cuda_" : "cpu_") +
         strategy_name(std::get<1>(i.param));
}

INSTANTIATE_TEST_SUITE_P(OnCpu, SpPackedOnDevice,
                         ::testing::Combine(::testing::Values(DeviceType::kCPU),
                                            ::testing::ValuesIn(all_strategies().begin(),
                                                                all_strategies().end())),
                         param_name);
INSTANTIATE_TEST_SUITE_P(OnCuda, SpPackedOnDevice,
                         ::testing::Combine(::testing::Values(DeviceType::kCUDA),
                                            ::testing::ValuesIn(all_strategies().begin(),
                                                                all_strategies().end())),
                         param_name);

// The local ops on the GPU: packed documents with a window, sink tokens and learned sinks,
// forward, backward (dsinks) and decode, against the reference.
TEST(PackedLocalOpsOnCuda, ForwardBackwardDecodeMatchReference) {
  if (!gpu_usable()) GTEST_SKIP() << "skipped: no GPU on every rank";
  const Device dev = device_world(DeviceType::kCUDA).device;
  const std::vector<int32_t> cu = {0, 1, 9, 40, 41, 97};
  const int64_t t = cu.back(), hq = 4, hkv = 2, d = 64;
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    Tensor q = Tensor::empty({1, t, hq, d}, dt), k = Tensor::empty({1, t, hkv, d}, dt),
           v = Tensor::empty({1, t, hkv, d}, dt), dout = Tensor::empty({1, t, hq, d}, dt);
    fill_test_data(q.view(), 41, 1);
    fill_test_data(k.view(), 41, 2);
    fill_test_data(v.view(), 41, 3);
    fill_test_data(dout.view(), 41, 4);
    Tensor sinks_h = Tensor::empty({hq}, DType::kFloat32);
    for (int64_t h = 0; h < hq; ++h) sinks_h.data_as<float>()[h] = 0.2f * static_cast<float>(h);
    Tensor sinks = to_device(sinks_h.view(), dev);
    ops::AttentionOptions o;
    o.causal = true;
    o.cu_seqlens = cu;
    o.window_left = 6;
    o.window_right = 0;
    o.sink_tokens = 2;
    ops::AttentionOptions ro = o;
    ro.sinks = sinks_h.view();
    o.sinks = sinks.view();
    const auto ref = kernels::cpu::reference_attention_forward(q.view(), k.view(), v.view(), ro);
    const auto rb =
        kernels::cpu::reference_attention_backward(q.view(), k.view(), v.view(), dout.view(), ro);
    Tensor dq_ = to_device(q.view(), dev), dk_ = to_device(k.view(), dev),
           dv_ = to_device(v.view(), dev), ddo = to_device(dout.view(), dev);
    Tensor out = poisoned({1, t, hq, d}, dt, dev), lse = poisoned({1, hq, t}, DType::kFloat32, dev);
    ops::attention_forward(dq_.view(), dk_.view(), dv_.view(), out.view(), lse.view(), o);
    const double tol = dt == DType::kFloat32 ? 1e-5 : 2e-2;
    expect_close("out", testing::to_double_vector(out.view()), ref.out, tol);
    expect_close("lse", testing::to_double_vector(lse.view()), ref.lse, tol);
    Tensor gq = poisoned({1, t, hq, d}, dt, dev), gk = poisoned({1, t, hkv, d}, dt, dev),
           gv = poisoned({1, t, hkv, d}, dt, dev), ds = poisoned({hq}, DType::kFloat32, dev);
    ops::BackwardOptions bo;
    bo.dsinks = ds.view();
    ops::attention_backward(dq_.view(), dk_.view(), dv_.view(), out.view(), ddo.view(), lse.view(),
                            gq.view(), gk.view(), gv.view(), o, bo);
    const double gtol = dt == DType::kFloat32 ? 2e-5 : 3e-2;
    expect_close("dq", testing::to_double_vector(gq.view()), rb.dq, gtol);
    expect_close("dk", testing::to_double_vector(gk.view()), rb.dk, gtol);
    expect_close("dv", testing::to_double_vector(gv.view()), rb.dv, gtol);
    expect_close("dsinks", testing::to_double_vector(ds.view()), rb.dsinks, gtol);
  }
}

}  // namespace
}  // namespace distattn::parallel
