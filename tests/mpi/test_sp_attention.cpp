// Sequence- and head-parallel attention vs the single-rank fp64 reference on the full
// sequence, at every rank count ctest runs (1, 2, 3, 4): every strategy, causal and not, GQA,
// forward out/lse and backward dq/dk/dv; communication volume against each strategy's
// formula; zigzag work balance; ring memory bound and O(S/P) scaling.
//
// Every rank builds the full inputs deterministically (tests/common/test_data.h), takes its
// shard, runs the strategy, and puts its local results back into full-size tensors with
// unshard_into(accumulate=true); an all-reduce sum then rebuilds the full results, which must
// match the reference (this also proves each layout covers every token exactly once).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/sp_expected_volume.h"
#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/parallel/sequence_parallel.h"
#include "kernels/cpu/reference.h"

namespace distattn::parallel {
namespace {

using testing::compare;
using testing::fill_test_data;
using testing::sp_expected_volume;
using testing::SpVolume;
using testing::to_double_vector;

std::shared_ptr<comm::Communicator> world_ptr() {
  static std::shared_ptr<comm::Communicator> w =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  return w;
}
comm::Communicator& world() {
  return *world_ptr();
}

// Hybrid: Ulysses 2 x ring P/2 when P is even, else Ulysses 1 x ring P.
int hybrid_ulysses(int p) {
  return p % 2 == 0 ? 2 : 1;
}

// The communicators of a strategy at the world's size (a mesh for hybrid).
struct Group {
  std::unique_ptr<comm::DeviceMesh> mesh;
  SpGroup group;
  SpLayout layout;
  int rank = 0;
  std::vector<comm::Communicator*> comms;  // whose ledgers count
};

Group make_group(Strategy s) {
  Group g;
  const int p = world().size();
  if (s == Strategy::kHybrid) {
    const int u = hybrid_ulysses(p);
    g.mesh = std::make_unique<comm::DeviceMesh>(
        world_ptr(), comm::DeviceMesh::Axes{{"ring", p / u}, {"ulysses", u}});
    g.group = SpGroup::from_mesh(*g.mesh);
    g.comms = {g.group.seq, g.group.ulysses};
  } else {
    g.group = SpGroup::flat(world());
    g.comms = {&world()};
  }
  g.layout = g.group.layout(s);
  g.rank = g.group.layout_rank(s);
  return g;
}

uint64_t ledger_bytes_sent(const Group& g) {
  uint64_t n = 0;
  for (auto* c : g.comms) n += c->ledger().total().bytes_sent;
  return n;
}
void reset_ledgers(const Group& g) {
  for (auto* c : g.comms) c->ledger().reset();
}

struct Case {
  Strategy strategy = Strategy::kRing;
  bool causal = false;
  DType dtype = DType::kFloat32;
  int64_t batch = 2, seq = 48, hq = 8, hkv = 2, d = 64;
  bool backward = true;
  // q, k, v as head slices of one fused [B, S, Hq + 2*Hkv, D] buffer, out a head slice of a
  // wider buffer: strided views, as trainers pass them.
  bool fused = false;
};

// dst <- src for 4-D views of equal shape (any strides, last dim contiguous).
void copy4d(const TensorView& dst, const TensorView& src) {
  const size_t row = static_cast<size_t>(src.size(3)) * src.element_size();
  for (int64_t b = 0; b < src.size(0); ++b)
    for (int64_t i = 0; i < src.size(1); ++i)
      for (int64_t h = 0; h < src.size(2); ++h) {
        const int64_t at[4] = {b, i, h, 0};
        std::memcpy(dst.element_ptr(at), src.element_ptr(at), row);
      }
}

std::string describe(const Case& c) {
  return std::string(strategy_name(c.strategy)) + (c.causal ? " causal" : " full") + " " +
         dtype_name(c.dtype) + " B=" + std::to_string(c.batch) + " S=" + std::to_string(c.seq) +
         " Hq=" + std::to_string(c.hq) + " Hkv=" + std::to_string(c.hkv) +
         " D=" + std::to_string(c.d) + " P=" + std::to_string(world().size());
}

// Every rank's accumulate-unshard of `local`, summed over ranks.
std::vector<double> rebuild(const Group& g, const SpShape& sh, ShardRole role,
                            const TensorView& local, std::initializer_list<int64_t> full_shape) {
  Tensor full = Tensor::zeros(full_shape, DType::kFloat64);
  Tensor local64 =
      Tensor::empty(std::span<const int64_t>(local.shape.data(), local.ndim), DType::kFloat64);
  convert_dtype_cpu(to_device(local, Device::cpu()).view(), local64.view());
  unshard_into(g.layout, sh, g.rank, role, local64.view(), full.view(), /*accumulate=*/true);
  world().all_reduce(full.data(), full.data(), static_cast<size_t>(full.numel()), DType::kFloat64,
                     comm::ReduceOp::kSum);
  return std::vector<double>(full.data_as<double>(), full.data_as<double>() + full.numel());
}

// Relative tolerance (max error / max |ref|): fp32 1e-5 for out/lse, 2e-5 for gradients
// (as the local kernels' own tests); bf16 2e-2.
void expect_close(const char* what, const Case& c, const std::vector<double>& got,
                  const Tensor& ref, bool gradient = false) {
  const std::vector<double> r(ref.data_as<double>(), ref.data_as<double>() + ref.numel());
  const auto st = compare(got, r);
  const double tol = c.dtype == DType::kFloat32 ? (gradient ? 2e-5 : 1e-5) : 2e-2;
  EXPECT_EQ(st.non_finite, 0) << what << " has non-finite values: " << describe(c);
  EXPECT_LE(st.rel(), tol) << what << " max_abs_err " << st.max_abs_err << " max_ref " << st.max_ref
                           << ": " << describe(c);
}

void run_case(const Case& c) {
  Group g = make_group(c.strategy);
  SpShape sh;
  sh.batch = c.batch;
  sh.seq = c.seq;
  sh.heads_q = c.hq;
  sh.heads_kv = c.hkv;
  sh.head_dim = c.d;
  check_layout(g.layout, sh);
  const int64_t b = c.batch, s = c.seq, dd = c.d;
  Tensor q = Tensor::empty({b, s, c.hq, dd}, c.dtype);
  Tensor k = Tensor::empty({b, s, c.hkv, dd}, c.dtype);
  Tensor v = Tensor::empty({b, s, c.hkv, dd}, c.dtype);
  Tensor dout = Tensor::empty({b, s, c.hq, dd}, c.dtype);
  fill_test_data(q.view(), 7, 1);
  fill_test_data(k.view(), 7, 2);
  fill_test_data(v.view(), 7, 3);
  fill_test_data(dout.view(), 7, 4);
  ops::AttentionOptions ro;
  ro.causal = c.causal;
  const auto ref = kernels::cpu::reference_attention_forward(q.view(), k.view(), v.view(), ro);

  Tensor ql = shard(g.layout, sh, g.rank, ShardRole::kQuery, q.view());
  Tensor kl = shard(g.layout, sh, g.rank, ShardRole::kKeyValue, k.view());
  Tensor vl = shard(g.layout, sh, g.rank, ShardRole::kKeyValue, v.view());
  Tensor dol = shard(g.layout, sh, g.rank, ShardRole::kQuery, dout.view());
  const int64_t sl = ql.view().size(1), hl = ql.view().size(2), hkl = kl.view().size(2);
  Tensor out_buf = Tensor::empty({b, sl, c.fused ? 2 * hl : hl, dd}, c.dtype);
  const TensorView out = out_buf.view().slice(2, 0, hl);
  Tensor lse = Tensor::empty({b, hl, sl}, DType::kFloat32);
  Tensor qkv = Tensor::empty({b, sl, hl + 2 * hkl, dd}, c.dtype);
  TensorView qv = ql.view(), kv = kl.view(), vv = vl.view();
  if (c.fused) {
    qv = qkv.view().slice(2, 0, hl);
    kv = qkv.view().slice(2, hl, hkl);
    vv = qkv.view().slice(2, hl + hkl, hkl);
    copy4d(qv, ql.view());
    copy4d(kv, kl.view());
    copy4d(vv, vl.view());
  }
  SpOptions opts;
  opts.causal = c.causal;
  opts.heads_q = c.hq;
  opts.heads_kv = c.hkv;
  sp_attention_forward(c.strategy, g.group, qv, kv, vv, out, lse.view(), opts);
  expect_close("out", c, rebuild(g, sh, ShardRole::kQuery, out, {b, s, c.hq, dd}), ref.out);
  expect_close("lse", c, rebuild(g, sh, ShardRole::kLse, lse.view(), {b, c.hq, s}), ref.lse);
  if (!c.backward) return;

  const auto rb =
      kernels::cpu::reference_attention_backward(q.view(), k.view(), v.view(), dout.view(), ro);
  Tensor dq = Tensor::empty({b, sl, hl, dd}, c.dtype);
  Tensor dk = Tensor::empty({b, sl, hkl, dd}, c.dtype);
  Tensor dv = Tensor::empty({b, sl, hkl, dd}, c.dtype);
  sp_attention_backward(c.strategy, g.group, qv, kv, vv, out, dol.view(), lse.view(), dq.view(),
                        dk.view(), dv.view(), opts);
  expect_close("dq", c, rebuild(g, sh, ShardRole::kQuery, dq.view(), {b, s, c.hq, dd}), rb.dq,
               true);
  expect_close("dk", c, rebuild(g, sh, ShardRole::kKeyValue, dk.view(), {b, s, c.hkv, dd}), rb.dk,
               true);
  expect_close("dv", c, rebuild(g, sh, ShardRole::kKeyValue, dv.view(), {b, s, c.hkv, dd}), rb.dv,
               true);
}

class SpAttention : public ::testing::TestWithParam<Strategy> {};

TEST_P(SpAttention, NonCausalGqaMatchesReference) {
  run_case({.strategy = GetParam(), .causal = false});
}

TEST_P(SpAttention, CausalGqaMatchesReference) {
  run_case({.strategy = GetParam(), .causal = true});
}

TEST_P(SpAttention, CausalMqaHeadDim128MatchesReference) {
  run_case({.strategy = GetParam(), .causal = true, .batch = 1, .hq = 4, .hkv = 1, .d = 128});
}

TEST_P(SpAttention, CausalBf16MatchesReference) {
  run_case({.strategy = GetParam(), .causal = true, .dtype = DType::kBFloat16, .batch = 1});
}

TEST_P(SpAttention, CausalFusedQkvStridedViewsMatchReference) {
  run_case({.strategy = GetParam(), .causal = true, .batch = 1, .fused = true});
}

TEST_P(SpAttention, CausalMhaLongerSequenceMatchesReference) {
  run_case({.strategy = GetParam(),
            .causal = true,
            .batch = 1,
            .seq = 96,
            .hq = 4,
            .hkv = 4,
            .d = 64,
            .backward = false});
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, SpAttention,
                         ::testing::ValuesIn(all_strategies().begin(), all_strategies().end()),
                         [](const ::testing::TestParamInfo<Strategy>& i) {
                           return std::string(strategy_name(i.param));
                         });

// ---- communication volume ----------------------------------------------------------------

TEST(SpAttentionVolume, LedgerBytesEqualEachStrategysFormula) {
  const int64_t b = 1, seq = 48, hq = 8, hkv = 2, d = 64;
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    for (Strategy s : all_strategies()) {
      Group g = make_group(s);
      SpShape sh{b, seq, hq, hkv, d, 0};
      Tensor q = Tensor::empty({b, seq, hq, d}, dt), k = Tensor::empty({b, seq, hkv, d}, dt),
             v = Tensor::empty({b, seq, hkv, d}, dt), dout = Tensor::empty({b, seq, hq, d}, dt);
      fill_test_data(q.view(), 3, 1);
      fill_test_data(k.view(), 3, 2);
      fill_test_data(v.view(), 3, 3);
      fill_test_data(dout.view(), 3, 4);
      Tensor ql = shard(g.layout, sh, g.rank, ShardRole::kQuery, q.view());
      Tensor kl = shard(g.layout, sh, g.rank, ShardRole::kKeyValue, k.view());
      Tensor vl = shard(g.layout, sh, g.rank, ShardRole::kKeyValue, v.view());
      Tensor dol = shard(g.layout, sh, g.rank, ShardRole::kQuery, dout.view());
      const int64_t sl = ql.view().size(1), hl = ql.view().size(2), hkl = kl.view().size(2);
      Tensor out = Tensor::empty({b, sl, hl, d}, dt),
             lse = Tensor::empty({b, hl, sl}, DType::kFloat32);
      Tensor dq = Tensor::empty({b, sl, hl, d}, dt), dk = Tensor::empty({b, sl, hkl, d}, dt),
             dv = Tensor::empty({b, sl, hkl, d}, dt);
      SpOptions o;
      o.causal = true;
      o.heads_q = hq;
      o.heads_kv = hkv;
      const SpVolume want =
          sp_expected_volume(g.layout, g.rank, b, seq, hq, hkv, d, dtype_size(dt));
      reset_ledgers(g);
      sp_attention_forward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(), lse.view(), o);
      EXPECT_EQ(ledger_bytes_sent(g), want.fwd)
          << strategy_name(s) << " forward " << dtype_name(dt) << " P=" << world().size();
      reset_ledgers(g);
      sp_attention_backward(s, g.group, ql.view(), kl.view(), vl.view(), out.view(), dol.view(),
                            lse.view(), dq.view(), dk.view(), dv.view(), o);
      EXPECT_EQ(ledger_bytes_sent(g), want.bwd)
          << strategy_name(s) << " backward " << dtype_name(dt) << " P=" << world().size();
      if (s == Strategy::kRing && world().size() > 1) {
        // The headline formula of the issue: (P-1)*2*B*(S/P)*Hkv*D*elt.
        const int p = world().size();
        EXPECT_EQ(want.fwd,
                  static_cast<uint64_t>((p - 1) * 2 * b * (seq / p) * hkv * d) * dtype_size(dt));
      }
    }
  }
}

// ---- work balance -------------------------------------------------------------------------

// Visible query-key pairs each rank's kernel calls attended (SpStats), gathered over ranks.
std::vector<double> measured_pairs(Strategy s, int64_t seq, bool causal, double* expected_mine) {
  Group g = make_group(s);
  const int64_t b = 1, hq = 4, hkv = 2, d = 64;
  SpShape sh{b, seq, hq, hkv, d, 0};
  Tensor q = Tensor::empty({b, seq, hq, d}, DType::kFloat32);
  Tensor k = Tensor::empty({b, seq, hkv, d}, DType::kFloat32);
  fill_test_data(q.view(), 5, 1);
  fill_test_data(k.view(), 5, 2);
  Tensor ql = shard(g.layout, sh, g.rank, ShardRole::kQuery, q.view());
  Tensor kl = shard(g.layout, sh, g.rank, ShardRole::kKeyValue, k.view());
  const int64_t sl = ql.view().size(1), hl = ql.view().size(2);
  Tensor out = Tensor::empty({b, sl, hl, d}, DType::kFloat32);
  Tensor lse = Tensor::empty({b, hl, sl}, DType::kFloat32);
  SpStats st;
  SpOptions o;
  o.causal = causal;
  o.heads_q = hq;
  o.heads_kv = hkv;
  o.stats = &st;
  sp_attention_forward(s, g.group, ql.view(), kl.view(), kl.view(), out.view(), lse.view(), o);
  *expected_mine = rank_forward_flops(g.layout, sh, g.rank, causal) / (4.0 * d);
  std::vector<double> all(static_cast<size_t>(world().size()));
  world().all_gather(&st.visible_pairs, all.data(), 1, DType::kFloat64);
  return all;
}

TEST(SpAttentionBalance, ZigzagCausalFlopsPerRankDifferByAtMostFivePercent) {
  for (Strategy s : {Strategy::kZigzag, Strategy::kAllGather, Strategy::kHybrid}) {
    double mine = 0;
    const auto all = measured_pairs(s, 8 * 24, /*causal=*/true, &mine);
    EXPECT_DOUBLE_EQ(all[static_cast<size_t>(world().rank())], mine) << strategy_name(s);
    const double mx = *std::max_element(all.begin(), all.end());
    const double mn = *std::min_element(all.begin(), all.end());
    ASSERT_GT(mn, 0) << strategy_name(s);
    EXPECT_LE((mx - mn) / mx, 0.05) << strategy_name(s) << ": max " << mx << " min " << mn;
  }
}

TEST(SpAttentionBalance, PlainRingCausalWorkGrowsWithRankAsDerived) {
  double mine = 0;
  const auto all = measured_pairs(Strategy::kRing, 8 * 24, /*causal=*/true, &mine);
  EXPECT_DOUBLE_EQ(all[static_cast<size_t>(world().rank())], mine);
  for (size_t r = 1; r < all.size(); ++r) EXPECT_GT(all[r], all[r - 1]);
}

// ---- memory -------------------------------------------------------------------------------

struct MemResult {
  int64_t scratch = 0;  // peak bytes allocated by the call beyond what existed before
  int64_t bound = 0;    // own K,V are the inputs; in flight: 2 K,V blocks + fp32 partial
};

MemResult ring_scratch(int64_t seq) {
  comm::Communicator& w = world();
  const int p = w.size();
  const int64_t b = 1, hq = 4, hkv = 2, d = 64, sl = seq / p;
  Tensor q = Tensor::empty({b, sl, hq, d}, DType::kFloat32);
  Tensor k = Tensor::empty({b, sl, hkv, d}, DType::kFloat32);
  Tensor v = Tensor::empty({b, sl, hkv, d}, DType::kFloat32);
  fill_test_data(q.view(), 9, 1, static_cast<uint64_t>(w.rank() * q.numel()));
  fill_test_data(k.view(), 9, 2, static_cast<uint64_t>(w.rank() * k.numel()));
  fill_test_data(v.view(), 9, 3, static_cast<uint64_t>(w.rank() * v.numel()));
  Tensor out = Tensor::empty({b, sl, hq, d}, DType::kFloat32);
  Tensor lse = Tensor::empty({b, hq, sl}, DType::kFloat32);
  SpOptions o;
  o.causal = true;
  w.barrier();
  const int64_t before = memory_stats(DeviceType::kCPU).current_bytes;
  reset_peak_memory(DeviceType::kCPU);
  sp_attention_forward(Strategy::kRing, SpGroup::flat(w), q.view(), k.view(), v.view(), out.view(),
                       lse.view(), o);
  MemResult m;
  m.scratch = memory_stats(DeviceType::kCPU).peak_bytes - before;
  const int64_t kv_block = 2 * b * sl * hkv * d * 4;
  const int64_t partial = (b * sl * hq * d + b * hq * sl) * 4;
  m.bound = p > 1 ? 2 * kv_block + partial : 0;
  return m;
}

TEST(SpAttentionMemory, RingHoldsOwnKvPlusInFlightBlocksAndScalesWithLocalSequence) {
  const int p = world().size();
  const MemResult a = ring_scratch(64 * p);
  const MemResult b = ring_scratch(128 * p);
  EXPECT_LE(a.scratch, a.bound);
  EXPECT_LE(b.scratch, b.bound);
  if (p > 1) {
    ASSERT_GT(a.scratch, 0);
    const double ratio = static_cast<double>(b.scratch) / static_cast<double>(a.scratch);
    EXPECT_NEAR(ratio, 2.0, 0.05) << "scratch " << a.scratch << " -> " << b.scratch;
  } else {
    EXPECT_EQ(a.scratch, 0);  // one rank: no buffers at all
  }
}

// Ring backward: K,V travel as in the forward (2 in-flight blocks in the input dtype) and each
// block carries an fp32 dK,dV accumulator (2 slots: one arriving, one leaving) plus this rank's
// fp32 contribution: 5 K,V-block-sized buffers, all proportional to the local sequence. The
// caller's q, k, v, out, dout, lse, dq, dk, dv exist before the call and do not count.
MemResult ring_backward_scratch(int64_t seq) {
  comm::Communicator& w = world();
  const int p = w.size();
  const int64_t b = 1, hq = 4, hkv = 2, d = 64, sl = seq / p;
  auto make = [&](std::initializer_list<int64_t> shape, uint64_t id) {
    Tensor t = Tensor::empty(shape, DType::kFloat32);
    fill_test_data(t.view(), 9, id, static_cast<uint64_t>(w.rank() * t.numel()));
    return t;
  };
  Tensor q = make({b, sl, hq, d}, 1), k = make({b, sl, hkv, d}, 2), v = make({b, sl, hkv, d}, 3);
  Tensor dout = make({b, sl, hq, d}, 4);
  Tensor out = Tensor::empty({b, sl, hq, d}, DType::kFloat32);
  Tensor lse = Tensor::empty({b, hq, sl}, DType::kFloat32);
  Tensor dq = Tensor::empty({b, sl, hq, d}, DType::kFloat32);
  Tensor dk = Tensor::empty({b, sl, hkv, d}, DType::kFloat32);
  Tensor dv = Tensor::empty({b, sl, hkv, d}, DType::kFloat32);
  SpOptions o;
  o.causal = true;
  sp_attention_forward(Strategy::kRing, SpGroup::flat(w), q.view(), k.view(), v.view(), out.view(),
                       lse.view(), o);
  w.barrier();
  const int64_t before = memory_stats(DeviceType::kCPU).current_bytes;
  reset_peak_memory(DeviceType::kCPU);
  sp_attention_backward(Strategy::kRing, SpGroup::flat(w), q.view(), k.view(), v.view(), out.view(),
                        dout.view(), lse.view(), dq.view(), dk.view(), dv.view(), o);
  MemResult m;
  m.scratch = memory_stats(DeviceType::kCPU).peak_bytes - before;
  const int64_t kv_block = 2 * b * sl * hkv * d * 4;
  // p == 1: only the one accumulator the single step computes into.
  m.bound = p > 1 ? 5 * kv_block : kv_block;
  return m;
}

TEST(SpAttentionMemory, RingBackwardHoldsInFlightBlocksAndAccumulatorsOnly) {
  const int p = world().size();
  const MemResult a = ring_backward_scratch(64 * p);
  const MemResult b = ring_backward_scratch(128 * p);
  EXPECT_LE(a.scratch, a.bound);
  EXPECT_LE(b.scratch, b.bound);
  ASSERT_GT(a.scratch, 0);  // at least the fp32 dK,dV accumulator
  const double ratio = static_cast<double>(b.scratch) / static_cast<double>(a.scratch);
  EXPECT_NEAR(ratio, 2.0, 0.05) << "scratch " << a.scratch << " -> " << b.scratch;
}

// ---- errors -------------------------------------------------------------------------------

TEST(SpAttentionErrors, IndivisibleSequenceNamesTheNeededMultiple) {
  const int p = world().size();
  SpShape sh{1, 2 * p + 1, 4, 2, 64, 0};
  try {
    check_layout(SpLayout{Strategy::kZigzag, p, 1}, sh);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of " + std::to_string(2 * p)), std::string::npos)
        << e.what();
  }
}

TEST(SpAttentionErrors, MismatchedShapesAreRejectedBeforeAnyCollective) {
  Tensor q = Tensor::empty({1, 8, 4, 64}, DType::kFloat32);
  Tensor k = Tensor::empty({1, 8, 3, 64}, DType::kFloat32);  // 4 % 3 != 0
  Tensor out = Tensor::empty({1, 8, 4, 64}, DType::kFloat32);
  Tensor lse = Tensor::empty({1, 4, 8}, DType::kFloat32);
  reset_ledgers(make_group(Strategy::kRing));
  EXPECT_THROW(sp_attention_forward(Strategy::kRing, SpGroup::flat(world()), q.view(), k.view(),
                                    k.view(), out.view(), lse.view()),
               Error);
  EXPECT_EQ(world().ledger().total().calls, 0u);
  Tensor bad_lse = Tensor::empty({1, 4, 7}, DType::kFloat32);
  EXPECT_THROW(sp_attention_forward(Strategy::kZigzag, SpGroup::flat(world()), q.view(), q.view(),
                                    q.view(), out.view(), bad_lse.view()),
               Error);
  EXPECT_THROW(sp_attention_forward(Strategy::kHybrid, SpGroup::flat(world()), q.view(), q.view(),
                                    q.view(), out.view(), lse.view()),
               Error);
}

}  // namespace
}  // namespace distattn::parallel
