// Every sequence- and head-parallel strategy with the local shards on this rank's GPU, against
// the single-rank fp64 reference on the full sequence: forward out/lse and backward dq/dk/dv,
// causal and not, GQA/MQA, fp32 and bf16, head dims 64 and 128 (the tensor-core kernels' dims),
// at whatever rank count mpirun gives (ctest: 1, 2, 4; all ranks share one GPU when the machine
// has one). The communicator is comm::create_world(kMpi, device): the MPI backend stages device
// memory through the host (NCCL refuses two ranks of one communicator on one GPU). Work is
// enqueued on a user-created non-blocking stream (SpOptions::stream); outputs start as NaN
// poison and are read back only after synchronizing that stream, so a result written on
// another stream, or not written at all, fails. The inputs are written on that stream right
// before each call, behind a 20 ms delay on GPU ranks (so reads not ordered after the
// caller's stream, e.g. a send staged without waiting for it, see NaN poison), and are
// poisoned on it right after each call returns (so work of the call still reading them,
// not ordered before the caller's later work, sees NaN).
//
// The test body is device-generic. The suite runs twice: OnCpu (CPU shards, CPU MPI world)
// everywhere, so CPU-only CI proves the test logic itself (layouts, rebuild, references,
// tolerances, ledger formulas), and OnCuda, which skips on every rank alike without a GPU.
// Same method as tests/mpi/test_sp_attention.cpp: every rank builds the full inputs
// deterministically, takes its shard (on the host, then copied to the device), runs the
// strategy, puts its local results back into full-size fp64 tensors with
// unshard_into(accumulate=true), and an all-reduce sum over the ranks rebuilds the full results.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "common/sp_expected_volume.h"
#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/config.h"
#include "distattn/ops/elementwise.h"
#include "distattn/parallel/sequence_parallel.h"
#include "distattn/runtime.h"
#include "kernels/cpu/reference.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/sp_device_util.h"

namespace distattn::parallel {
namespace {

using testing::compare;
using testing::fill_test_data;
using testing::poisoned;
using testing::sp_expected_volume;
using testing::SpVolume;
using testing::sp_device::all_ranks;
using testing::sp_device::device_world;
using testing::sp_device::DeviceWorld;
using testing::sp_device::gpu_usable;
using testing::sp_device::host_world;
using testing::sp_device::UserStream;

// Hybrid: Ulysses 2 x ring P/2 when P is even, else Ulysses 1 x ring P (as the CPU test).
int hybrid_ulysses(int p) {
  return p % 2 == 0 ? 2 : 1;
}

// The communicators of a strategy over one device's world (a mesh for hybrid).
struct Group {
  std::unique_ptr<comm::DeviceMesh> mesh;
  SpGroup group;
  SpLayout layout;
  int rank = 0;
  std::vector<comm::Communicator*> comms;  // whose ledgers count
};

Group make_group(Strategy s, DeviceWorld& w) {
  Group g;
  const int p = w.comm->size();
  if (s == Strategy::kHybrid) {
    const int u = hybrid_ulysses(p);
    g.mesh = std::make_unique<comm::DeviceMesh>(
        w.comm, comm::DeviceMesh::Axes{{"ring", p / u}, {"ulysses", u}});
    g.group = SpGroup::from_mesh(*g.mesh);
    g.comms = {g.group.seq, g.group.ulysses};
  } else {
    g.group = SpGroup::flat(*w.comm);
    g.comms = {w.comm.get()};
  }
  g.layout = g.group.layout(s);
  g.rank = g.group.layout_rank(s);
  return g;
}

// Smallest multiple of 2P at or above `base`: every layout (zigzag, all-gather, hybrid need
// S % 2P == 0) accepts it at any rank count.
int64_t seq_for(int64_t base, int p) {
  const int64_t m = 2 * static_cast<int64_t>(p);
  return (base + m - 1) / m * m;
}

struct Case {
  bool causal = false;
  DType dtype = DType::kFloat32;
  int64_t batch = 2, hq = 8, hkv = 2, d = 64;
  // Global sequence before rounding up to a multiple of 2P: a few hundred tokens on the GPU
  // (several kernel tiles per rank), the CPU test's 48 on CPU ranks (seconds at np 4 on 2
  // cores).
  int64_t seq_cuda = 256, seq_cpu = 48;
  bool backward = true;
  // q, k, v as head slices of one fused [B, Sl, Hq + 2*Hkv, D] device buffer and out a head
  // slice of a wider buffer: strided views, as trainers pass them.
  bool fused = false;
};

struct RunInfo {
  Strategy strategy;
  Device device;
  int ranks;
  int64_t seq;
};

std::string describe(const Case& c, const RunInfo& r) {
  return std::string(strategy_name(r.strategy)) + (c.causal ? " causal " : " full ") +
         dtype_name(c.dtype) + " B=" + std::to_string(c.batch) + " S=" + std::to_string(r.seq) +
         " Hq=" + std::to_string(c.hq) + " Hkv=" + std::to_string(c.hkv) +
         " D=" + std::to_string(c.d) + " P=" + std::to_string(r.ranks) + " on " + r.device.str();
}

// Full-size host inputs and their fp64 references, built once per (case, seq) and shared by
// every strategy (the reference does not depend on the strategy; at S = 256 it is the
// slowest part of a GPU run).
struct Problem {
  Tensor q, k, v, dout;  // host, storage dtype
  kernels::cpu::ReferenceForward fwd;
  kernels::cpu::ReferenceBackward bwd;
  bool has_bwd = false;
};

const Problem& problem_for(const Case& c, int64_t seq) {
  static std::map<std::string, std::unique_ptr<Problem>> cache;
  const std::string key = std::to_string(c.causal) + dtype_name(c.dtype) + "b" +
                          std::to_string(c.batch) + "s" + std::to_string(seq) + "h" +
                          std::to_string(c.hq) + "k" + std::to_string(c.hkv) + "d" +
                          std::to_string(c.d);
  auto& slot = cache[key];
  if (!slot) {
    slot = std::make_unique<Problem>();
    Problem& pr = *slot;
    pr.q = Tensor::empty({c.batch, seq, c.hq, c.d}, c.dtype);
    pr.k = Tensor::empty({c.batch, seq, c.hkv, c.d}, c.dtype);
    pr.v = Tensor::empty({c.batch, seq, c.hkv, c.d}, c.dtype);
    pr.dout = Tensor::empty({c.batch, seq, c.hq, c.d}, c.dtype);
    fill_test_data(pr.q.view(), 7, 1);
    fill_test_data(pr.k.view(), 7, 2);
    fill_test_data(pr.v.view(), 7, 3);
    fill_test_data(pr.dout.view(), 7, 4);
    ops::AttentionOptions ro;
    ro.causal = c.causal;
    pr.fwd = kernels::cpu::reference_attention_forward(pr.q.view(), pr.k.view(), pr.v.view(), ro);
  }
  if (c.backward && !slot->has_bwd) {
    ops::AttentionOptions ro;
    ro.causal = c.causal;
    slot->bwd = kernels::cpu::reference_attention_backward(slot->q.view(), slot->k.view(),
                                                           slot->v.view(), slot->dout.view(), ro);
    slot->has_bwd = true;
  }
  return *slot;
}

// Every rank's accumulate-unshard of `local` (any device; read after the stream sync), summed
// over the ranks on the host world.
std::vector<double> rebuild(const Group& g, const SpShape& sh, ShardRole role,
                            const TensorView& local, std::initializer_list<int64_t> full_shape) {
  Tensor full = Tensor::zeros(full_shape, DType::kFloat64);
  Tensor host = to_device(local, Device::cpu());
  Tensor local64 =
      Tensor::empty(std::span<const int64_t>(local.shape.data(), local.ndim), DType::kFloat64);
  convert_dtype_cpu(host.view(), local64.view());
  unshard_into(g.layout, sh, g.rank, role, local64.view(), full.view(), /*accumulate=*/true);
  host_world().all_reduce(full.data(), full.data(), static_cast<size_t>(full.numel()),
                          DType::kFloat64, comm::ReduceOp::kSum);
  return std::vector<double>(full.data_as<double>(), full.data_as<double>() + full.numel());
}

// dst <- src for 4-D host views of equal shape (any strides, last dim contiguous).
void copy4d(const TensorView& dst, const TensorView& src) {
  const size_t row = static_cast<size_t>(src.size(3)) * src.element_size();
  for (int64_t b = 0; b < src.size(0); ++b)
    for (int64_t i = 0; i < src.size(1); ++i)
      for (int64_t h = 0; h < src.size(2); ++h) {
        const int64_t at[4] = {b, i, h, 0};
        std::memcpy(dst.element_ptr(at), src.element_ptr(at), row);
      }
}

// A host copy of `storage` (packed, any device) and the view `v` into it re-aimed at the copy:
// to_device gathers strided views only from the host.
struct HostView {
  Tensor storage;
  TensorView view;
};
HostView host_view(const Tensor& storage, const TensorView& v) {
  HostView h;
  h.storage = to_device(storage.view(), Device::cpu());
  const auto offset = static_cast<const char*>(v.data) - static_cast<const char*>(storage.data());
  h.view = v;
  h.view.data = static_cast<char*>(h.storage.data()) + offset;
  h.view.device = Device::cpu();
  return h;
}

// Relative tolerance (max error / max |ref|), as the CPU strategy test and the kernels' own
// tests: fp32 1e-5 for out/lse, 2e-5 for gradients; bf16 2e-2 (storage rounding dominates).
void expect_close(const char* what, const std::string& desc, DType dtype,
                  const std::vector<double>& got, const Tensor& ref, bool gradient = false) {
  const std::vector<double> r(ref.data_as<double>(), ref.data_as<double>() + ref.numel());
  const auto st = compare(got, r);
  const double tol = dtype == DType::kFloat32 ? (gradient ? 2e-5 : 1e-5) : 2e-2;
  EXPECT_EQ(st.non_finite, 0) << what << " has non-finite values (NaN poison left?): " << desc;
  EXPECT_LE(st.rel(), tol) << what << " max_abs_err " << st.max_abs_err << " max_ref " << st.max_ref
                           << ": " << desc;
}

void run_case(Strategy strategy, DeviceWorld& w, const Case& c) {
  Group g = make_group(strategy, w);
  const int p = g.layout.ranks;
  const int64_t seq = seq_for(w.device.is_cuda() ? c.seq_cuda : c.seq_cpu, p);
  const RunInfo run{strategy, w.device, p, seq};
  const std::string desc = describe(c, run);
  SCOPED_TRACE(desc);
  SpShape sh;
  sh.batch = c.batch;
  sh.seq = seq;
  sh.heads_q = c.hq;
  sh.heads_kv = c.hkv;
  sh.head_dim = c.d;
  check_layout(g.layout, sh);
  const Problem& pr = problem_for(c, seq);
  const int64_t b = c.batch, dd = c.d;
  const Device dev = w.device;

  auto local = [&](ShardRole role, const Tensor& full) {
    return to_device(shard(g.layout, sh, g.rank, role, full.view()).view(), dev);
  };
  const Tensor ql = local(ShardRole::kQuery, pr.q);
  const Tensor kl = local(ShardRole::kKeyValue, pr.k);
  const Tensor vl = local(ShardRole::kKeyValue, pr.v);
  const Tensor dol = local(ShardRole::kQuery, pr.dout);
  ASSERT_EQ(ql.device(), dev);
  const int64_t sl = ql.view().size(1), hl = ql.view().size(2), hkl = kl.view().size(2);
  ASSERT_EQ(sl, local_seq_len(g.layout, seq));

  TensorView qv = ql.view(), kv = kl.view(), vv = vl.view();
  Tensor qkv;
  if (c.fused) {
    Tensor fused = Tensor::empty({b, sl, hl + 2 * hkl, dd}, c.dtype);
    copy4d(fused.view().slice(2, 0, hl), to_device(ql.view(), Device::cpu()).view());
    copy4d(fused.view().slice(2, hl, hkl), to_device(kl.view(), Device::cpu()).view());
    copy4d(fused.view().slice(2, hl + hkl, hkl), to_device(vl.view(), Device::cpu()).view());
    qkv = to_device(fused.view(), dev);
    qv = qkv.view().slice(2, 0, hl);
    kv = qkv.view().slice(2, hl, hkl);
    vv = qkv.view().slice(2, hl + hkl, hkl);
  }
  const Tensor out_buf = poisoned({b, sl, c.fused ? 2 * hl : hl, dd}, c.dtype, dev);
  const TensorView out = out_buf.view().slice(2, 0, hl);
  const Tensor lse = poisoned({b, hl, sl}, DType::kFloat32, dev);
  UserStream stream(dev);
  // The inputs the calls see are written on the user stream, late (behind a delay on GPU
  // ranks), as a trainer's producer kernels would write them: the library must order every
  // read of them (its kernels, and the MPI staging copies on its comm stream) after the
  // user stream's work. Between the calls they are poisoned on the user stream and written
  // again: work of a call still reading them after it returned would see NaN.
  Tensor qkv_in, q_in, k_in, v_in;
  const Tensor dout_in = poisoned({b, sl, hl, dd}, c.dtype, dev);
  TensorView qi, ki, vi;
  if (c.fused) {
    qkv_in = poisoned({b, sl, hl + 2 * hkl, dd}, c.dtype, dev);
    qi = qkv_in.view().slice(2, 0, hl);
    ki = qkv_in.view().slice(2, hl, hkl);
    vi = qkv_in.view().slice(2, hl + hkl, hkl);
  } else {
    q_in = poisoned({b, sl, hl, dd}, c.dtype, dev);
    k_in = poisoned({b, sl, hkl, dd}, c.dtype, dev);
    v_in = poisoned({b, sl, hkl, dd}, c.dtype, dev);
    qi = q_in.view();
    ki = k_in.view();
    vi = v_in.view();
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto write_inputs_late = [&] {
    stream.delay(20);
    ops::tensor_copy(qi, qv, stream.get());
    ops::tensor_copy(ki, kv, stream.get());
    ops::tensor_copy(vi, vv, stream.get());
    ops::tensor_copy(dout_in.view(), dol.view(), stream.get());
  };
  auto poison_inputs = [&] {
    for (const TensorView& t : {qi, ki, vi, dout_in.view()}) ops::tensor_fill(t, nan, stream.get());
  };
  SpOptions opts;
  opts.causal = c.causal;
  opts.heads_q = c.hq;
  opts.heads_kv = c.hkv;
  opts.stream = stream.get();
  write_inputs_late();
  sp_attention_forward(strategy, g.group, qi, ki, vi, out, lse.view(), opts);
  poison_inputs();
  stream.synchronize();
  const HostView out_host = host_view(out_buf, out);
  expect_close("out", desc, c.dtype,
               rebuild(g, sh, ShardRole::kQuery, out_host.view, {b, seq, c.hq, dd}), pr.fwd.out);
  if (c.fused) {  // the other heads of the wider output buffer are untouched (still NaN)
    const HostView rest = host_view(out_buf, out_buf.view().slice(2, hl, hl));
    const std::vector<double> v = testing::to_double_vector(rest.view);
    EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](double x) { return std::isnan(x); }))
        << "out wrote outside its head slice: " << desc;
  }
  expect_close("lse", desc, c.dtype, rebuild(g, sh, ShardRole::kLse, lse, {b, c.hq, seq}),
               pr.fwd.lse);
  if (!c.backward) return;

  const Tensor dq = poisoned({b, sl, hl, dd}, c.dtype, dev);
  const Tensor dk = poisoned({b, sl, hkl, dd}, c.dtype, dev);
  const Tensor dv = poisoned({b, sl, hkl, dd}, c.dtype, dev);
  write_inputs_late();
  sp_attention_backward(strategy, g.group, qi, ki, vi, out, dout_in.view(), lse.view(), dq.view(),
                        dk.view(), dv.view(), opts);
  poison_inputs();
  stream.synchronize();
  expect_close("dq", desc, c.dtype, rebuild(g, sh, ShardRole::kQuery, dq, {b, seq, c.hq, dd}),
               pr.bwd.dq, true);
  expect_close("dk", desc, c.dtype, rebuild(g, sh, ShardRole::kKeyValue, dk, {b, seq, c.hkv, dd}),
               pr.bwd.dk, true);
  expect_close("dv", desc, c.dtype, rebuild(g, sh, ShardRole::kKeyValue, dv, {b, seq, c.hkv, dd}),
               pr.bwd.dv, true);
}

using Param = std::tuple<DeviceType, Strategy>;

class SpOnDevice : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    // gpu_usable() is one all-ranks decision (computed once, collectively), so every rank
    // skips alike and none waits in a collective another rank skipped.
    if (std::get<0>(GetParam()) == DeviceType::kCUDA && !gpu_usable())
      GTEST_SKIP() << "skipped: no GPU (or a build without CUDA)";
  }
  Strategy strategy() const { return std::get<1>(GetParam()); }
  DeviceWorld& world() { return device_world(std::get<0>(GetParam())); }
  void run(const Case& c) { run_case(strategy(), world(), c); }
};

TEST_P(SpOnDevice, NonCausalGqaFp32HeadDim64MatchesReference) {
  run({.causal = false});
}

TEST_P(SpOnDevice, CausalGqaFp32HeadDim64MatchesReference) {
  run({.causal = true});
}

TEST_P(SpOnDevice, CausalMqaFp32HeadDim128MatchesReference) {
  run({.causal = true, .batch = 1, .hq = 4, .hkv = 1, .d = 128});
}

// bf16 at D = 64 and 128: the tensor-core (mma) forward and backward kernels on the GPU.
TEST_P(SpOnDevice, NonCausalGqaBf16HeadDim64MatchesReference) {
  run({.causal = false, .dtype = DType::kBFloat16, .batch = 1});
}

TEST_P(SpOnDevice, CausalGqaBf16HeadDim128MatchesReference) {
  run({.causal = true, .dtype = DType::kBFloat16, .batch = 1, .d = 128});
}

TEST_P(SpOnDevice, CausalFusedQkvStridedViewsBf16HeadDim128MatchReference) {
  run({.causal = true,
       .dtype = DType::kBFloat16,
       .batch = 1,
       .hq = 4,
       .hkv = 2,
       .d = 128,
       .fused = true});
}

// fp32 out is the accumulator itself (no fp32 scratch): kernels and merges write the strided
// head slice of the wider buffer directly.
TEST_P(SpOnDevice, NonCausalFusedQkvStridedViewsFp32HeadDim64MatchReference) {
  run({.causal = false, .batch = 1, .hq = 4, .hkv = 2, .fused = true});
}

TEST_P(SpOnDevice, CausalMhaBf16HeadDim64LongerSequenceForwardMatchesReference) {
  run({.causal = true,
       .dtype = DType::kBFloat16,
       .batch = 1,
       .hq = 4,
       .hkv = 4,
       .seq_cuda = 512,
       .seq_cpu = 96,
       .backward = false});
}

// ---- stats and communication volume -----------------------------------------------------

uint64_t ledger_bytes_sent(const Group& g) {
  uint64_t n = 0;
  for (auto* c : g.comms) n += c->ledger().total().bytes_sent;
  return n;
}
void reset_ledgers(const Group& g) {
  for (auto* c : g.comms) c->ledger().reset();
}

// SpStats filled on device ranks (non-zero times, ring steps, the visible query-key pairs of
// rank_forward_flops), and the ledger's bytes equal to the CPU formula, forward and backward,
// fp32 and bf16. Results are checked too: the figures must come from a correct run.
TEST_P(SpOnDevice, StatsAndLedgerBytesMatchTheCpuFormulas) {
  const Strategy s = strategy();
  DeviceWorld& w = world();
  const Device dev = w.device;
  const int64_t b = 1, hq = 8, hkv = 2, d = 64;
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    Group g = make_group(s, w);
    const int p = g.layout.ranks;
    const int64_t seq = seq_for(dev.is_cuda() ? 256 : 48, p);
    const Case c{.causal = true, .dtype = dt, .batch = b, .hq = hq, .hkv = hkv, .d = d};
    const std::string desc = describe(c, RunInfo{s, dev, p, seq});
    SCOPED_TRACE(desc);
    SpShape sh{b, seq, hq, hkv, d, 0};
    const Problem& pr = problem_for(c, seq);
    auto local = [&](ShardRole role, const Tensor& full) {
      return to_device(shard(g.layout, sh, g.rank, role, full.view()).view(), dev);
    };
    const Tensor ql = local(ShardRole::kQuery, pr.q), kl = local(ShardRole::kKeyValue, pr.k),
                 vl = local(ShardRole::kKeyValue, pr.v), dol = local(ShardRole::kQuery, pr.dout);
    const int64_t sl = ql.view().size(1), hl = ql.view().size(2), hkl = kl.view().size(2);
    const Tensor out = poisoned({b, sl, hl, d}, dt, dev);
    const Tensor lse = poisoned({b, hl, sl}, DType::kFloat32, dev);
    const Tensor dq = poisoned({b, sl, hl, d}, dt, dev);
    const Tensor dk = poisoned({b, sl, hkl, d}, dt, dev);
    const Tensor dv = poisoned({b, sl, hkl, d}, dt, dev);
    UserStream stream(dev);
    SpStats st;
    st.total_s = st.compute_s = st.exposed_comm_s = st.visible_pairs = -1;  // must be overwritten
    st.steps = -1;
    SpOptions o;
    o.causal = true;
    o.heads_q = hq;
    o.heads_kv = hkv;
    o.stream = stream.get();
    o.stats = &st;
    const SpVolume want = sp_expected_volume(g.layout, g.rank, b, seq, hq, hkv, d, dtype_size(dt));

    reset_ledgers(g);
    sp_attention_forward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(), lse.view(), o);
    stream.synchronize();
    EXPECT_EQ(ledger_bytes_sent(g), want.fwd) << "forward";
    EXPECT_GT(st.total_s, 0.0);
    EXPECT_GT(st.compute_s, 0.0);
    EXPECT_GE(st.exposed_comm_s, 0.0);
    EXPECT_LE(st.compute_s, st.total_s);
    EXPECT_LE(st.exposed_comm_s, st.total_s);
    if (s == Strategy::kRing || s == Strategy::kZigzag)
      EXPECT_EQ(st.steps, p) << "one ring step per rank";
    else
      EXPECT_GE(st.steps, 1);
    EXPECT_DOUBLE_EQ(st.visible_pairs, rank_forward_flops(g.layout, sh, g.rank, true) / (4.0 * d));
    expect_close("out", desc, dt, rebuild(g, sh, ShardRole::kQuery, out, {b, seq, hq, d}),
                 pr.fwd.out);

    st = SpStats{};
    reset_ledgers(g);
    sp_attention_backward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(), dol.view(),
                          lse.view(), dq.view(), dk.view(), dv.view(), o);
    stream.synchronize();
    EXPECT_EQ(ledger_bytes_sent(g), want.bwd) << "backward";
    EXPECT_GT(st.total_s, 0.0);
    EXPECT_GT(st.compute_s, 0.0);
    EXPECT_LE(st.compute_s, st.total_s);
    expect_close("dv", desc, dt, rebuild(g, sh, ShardRole::kKeyValue, dv, {b, seq, hkv, d}),
                 pr.bwd.dv, true);
    if (s == Strategy::kRing && p > 1) {
      // The headline formula of the issue: (P-1)*2*B*(S/P)*Hkv*D*elt.
      EXPECT_EQ(want.fwd,
                static_cast<uint64_t>((p - 1) * 2 * b * (seq / p) * hkv * d) * dtype_size(dt));
    }
  }
}

std::string param_name(const ::testing::TestParamInfo<Param>& i) {
  return std::string(std::get<0>(i.param) == DeviceType::kCUDA ? "cuda_" : "cpu_") +
         strategy_name(std::get<1>(i.param));
}

INSTANTIATE_TEST_SUITE_P(OnCpu, SpOnDevice,
                         ::testing::Combine(::testing::Values(DeviceType::kCPU),
                                            ::testing::ValuesIn(all_strategies().begin(),
                                                                all_strategies().end())),
                         param_name);
INSTANTIATE_TEST_SUITE_P(OnCuda, SpOnDevice,
                         ::testing::Combine(::testing::Values(DeviceType::kCUDA),
                                            ::testing::ValuesIn(all_strategies().begin(),
                                                                all_strategies().end())),
                         param_name);

// Tensors of one call on different devices are rejected on every rank before any collective
// (a GPU-only check: on CPU ranks there is no second device).
TEST(SpOnCudaErrors, MixedDeviceTensorsAreRejectedBeforeAnyCollective) {
  if (!gpu_usable()) GTEST_SKIP() << "skipped: no GPU (or a build without CUDA)";
  DeviceWorld& w = device_world(DeviceType::kCUDA);
  const Device dev = w.device;
  const int64_t sl = 8;
  const Tensor q = Tensor::zeros({1, sl, 4, 64}, DType::kFloat32, dev);
  const Tensor k = Tensor::zeros({1, sl, 2, 64}, DType::kFloat32, dev);
  const Tensor k_host = Tensor::zeros({1, sl, 2, 64}, DType::kFloat32);
  const Tensor out = Tensor::zeros({1, sl, 4, 64}, DType::kFloat32, dev);
  const Tensor out_host = Tensor::zeros({1, sl, 4, 64}, DType::kFloat32);
  const Tensor lse = Tensor::zeros({1, 4, sl}, DType::kFloat32, dev);
  w.comm->ledger().reset();
  const SpGroup g = SpGroup::flat(*w.comm);
  EXPECT_THROW(sp_attention_forward(Strategy::kRing, g, q, k_host, k_host, out, lse), Error);
  EXPECT_THROW(sp_attention_forward(Strategy::kZigzag, g, q, k, k, out_host, lse), Error);
  EXPECT_THROW(sp_attention_backward(Strategy::kRing, g, q, k, k, out, out, lse, out_host, k, k),
               Error);
  EXPECT_EQ(w.comm->ledger().total().calls, 0u);
}

// The skip decision itself: one value on every rank (a rank that skipped while another ran
// would leave the other waiting in a collective until the watchdog fires).
TEST(SpOnDeviceSkip, GpuDecisionIsTheSameOnEveryRank) {
  const bool mine = gpu_usable();
  EXPECT_EQ(all_ranks(mine), mine);
  EXPECT_EQ(all_ranks(!mine), !mine);
}

}  // namespace
}  // namespace distattn::parallel
