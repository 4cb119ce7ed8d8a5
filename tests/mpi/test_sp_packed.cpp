// Packed documents (cu_seqlens), sliding windows, sink tokens and learned sinks under every
// strategy, forward and backward, against the fp64 reference on the full packed sequence, at
// every rank count ctest runs (1, 2, 3, 4; hybrid 2x2 at 4). Also: the balanced packed layout
// (per-rank visible pairs of a long-tail batch under zigzag within 5%), and the window-aware
// ring (steps after the window are not run; ledger bytes equal the formula).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/parallel/sequence_parallel.h"
#include "kernels/cpu/reference.h"

namespace distattn::parallel {
namespace {

using testing::compare;
using testing::fill_test_data;

std::shared_ptr<comm::Communicator> world_ptr() {
  static std::shared_ptr<comm::Communicator> w =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  return w;
}
comm::Communicator& world() {
  return *world_ptr();
}

struct Group {
  std::unique_ptr<comm::DeviceMesh> mesh;
  SpGroup group;
  SpLayout layout;
  int rank = 0;
  std::vector<comm::Communicator*> comms;
};

Group make_group(Strategy s) {
  Group g;
  const int p = world().size();
  if (s == Strategy::kHybrid) {
    const int u = p % 2 == 0 ? 2 : 1;
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

std::vector<int32_t> cu_of(const std::vector<int64_t>& lens) {
  std::vector<int32_t> cu{0};
  for (int64_t l : lens) cu.push_back(cu.back() + static_cast<int32_t>(l));
  return cu;
}

struct Case {
  Strategy strategy = Strategy::kZigzag;
  std::vector<int64_t> docs;  // empty: one document of `seq` tokens
  int64_t seq = 0;            // used when docs is empty
  bool causal = true;
  int64_t wl = -1, wr = -1, sink_tokens = 0;
  bool sinks = false;
  DType dtype = DType::kFloat32;
  int64_t hq = 4, hkv = 2, d = 64;
  bool backward = true;
  // 1: every document is split into zigzag chunks (the split path on small documents);
  // 128 (the default): these short documents stay whole, assigned for balance.
  int64_t min_chunk = 1;
};

std::string describe(const Case& c) {
  std::string docs;
  for (int64_t l : c.docs) docs += (docs.empty() ? "" : ",") + std::to_string(l);
  return std::string(strategy_name(c.strategy)) + (c.causal ? " causal" : " full") + " docs=[" +
         docs + "] seq=" + std::to_string(c.seq) + " window=" + std::to_string(c.wl) + "," +
         std::to_string(c.wr) + " sink_tokens=" + std::to_string(c.sink_tokens) +
         (c.sinks ? " sinks" : "") + " " + dtype_name(c.dtype) + " Hq=" + std::to_string(c.hq) +
         " Hkv=" + std::to_string(c.hkv) + " D=" + std::to_string(c.d) +
         " min_chunk=" + std::to_string(c.min_chunk) + " P=" + std::to_string(world().size());
}

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

void expect_close(const char* what, const Case& c, const std::vector<double>& got,
                  const Tensor& ref, bool gradient = false) {
  const std::vector<double> r(ref.data_as<double>(), ref.data_as<double>() + ref.numel());
  const auto st = compare(got, r);
  const double tol = c.dtype == DType::kFloat32 ? (gradient ? 2e-5 : 1e-5) : 2e-2;
  EXPECT_EQ(st.non_finite, 0) << what << " has non-finite values: " << describe(c);
  EXPECT_LE(st.rel(), tol) << what << " max_abs_err " << st.max_abs_err << " max_ref " << st.max_ref
                           << ": " << describe(c);
}

// lse of fully masked rows is -inf in both: compare finite entries, and -inf positions.
void expect_lse(const Case& c, const std::vector<double>& got, const Tensor& ref) {
  std::vector<double> a, b;
  int64_t mismatched_inf = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double r = ref.data_as<double>()[i];
    if (std::isinf(r) || std::isinf(got[i])) {
      mismatched_inf += (std::isinf(r) != std::isinf(got[i])) ? 1 : 0;
      continue;
    }
    a.push_back(got[i]);
    b.push_back(r);
  }
  EXPECT_EQ(mismatched_inf, 0) << "lse -inf rows differ: " << describe(c);
  const auto st = compare(a, b);
  EXPECT_LE(st.rel(), c.dtype == DType::kFloat32 ? 1e-5 : 2e-2) << "lse: " << describe(c);
}

void run_case(const Case& c) {
  Group g = make_group(c.strategy);
  const int64_t s =
      c.docs.empty() ? c.seq : std::accumulate(c.docs.begin(), c.docs.end(), int64_t{0});
  SpShape sh;
  sh.batch = 1;
  sh.seq = s;
  sh.heads_q = c.hq;
  sh.heads_kv = c.hkv;
  sh.head_dim = c.d;
  if (!c.docs.empty()) sh.cu_seqlens = cu_of(c.docs);
  sh.min_split_chunk = c.min_chunk;
  const int64_t dd = c.d;
  Tensor q = Tensor::empty({1, s, c.hq, dd}, c.dtype);
  Tensor k = Tensor::empty({1, s, c.hkv, dd}, c.dtype);
  Tensor v = Tensor::empty({1, s, c.hkv, dd}, c.dtype);
  Tensor dout = Tensor::empty({1, s, c.hq, dd}, c.dtype);
  fill_test_data(q.view(), 11, 1);
  fill_test_data(k.view(), 11, 2);
  fill_test_data(v.view(), 11, 3);
  fill_test_data(dout.view(), 11, 4);
  Tensor sinks = Tensor::empty({c.hq}, DType::kFloat32);
  for (int64_t h = 0; h < c.hq; ++h)
    sinks.data_as<float>()[h] = 0.5f * static_cast<float>(h) - 0.7f;

  ops::AttentionOptions ro;
  ro.causal = c.causal;
  ro.cu_seqlens = sh.cu_seqlens;
  ro.window_left = c.wl;
  ro.window_right = c.wr;
  ro.sink_tokens = c.sink_tokens;
  if (c.sinks) ro.sinks = sinks.view();
  const auto ref = kernels::cpu::reference_attention_forward(q.view(), k.view(), v.view(), ro);

  Tensor ql = shard(g.layout, sh, g.rank, ShardRole::kQuery, q.view());
  Tensor kl = shard(g.layout, sh, g.rank, ShardRole::kKeyValue, k.view());
  Tensor vl = shard(g.layout, sh, g.rank, ShardRole::kKeyValue, v.view());
  Tensor dol = shard(g.layout, sh, g.rank, ShardRole::kQuery, dout.view());
  const int64_t sl = ql.view().size(1), hl = ql.view().size(2), hkl = kl.view().size(2);
  Tensor out = Tensor::empty({1, sl, hl, dd}, c.dtype);
  Tensor lse = Tensor::empty({1, hl, sl}, DType::kFloat32);
  SpOptions opts;
  opts.causal = c.causal;
  opts.heads_q = c.hq;
  opts.heads_kv = c.hkv;
  opts.cu_seqlens = sh.cu_seqlens;
  opts.min_split_chunk = c.min_chunk;
  opts.window_left = c.wl;
  opts.window_right = c.wr;
  opts.sink_tokens = c.sink_tokens;
  if (c.sinks) opts.sinks = sinks.view();
  sp_attention_forward(c.strategy, g.group, ql.view(), kl.view(), vl.view(), out.view(), lse.view(),
                       opts);
  expect_close("out", c, rebuild(g, sh, ShardRole::kQuery, out.view(), {1, s, c.hq, dd}), ref.out);
  expect_lse(c, rebuild(g, sh, ShardRole::kLse, lse.view(), {1, c.hq, s}), ref.lse);
  if (!c.backward) return;

  const auto rb =
      kernels::cpu::reference_attention_backward(q.view(), k.view(), v.view(), dout.view(), ro);
  Tensor dq = Tensor::empty({1, sl, hl, dd}, c.dtype);
  Tensor dk = Tensor::empty({1, sl, hkl, dd}, c.dtype);
  Tensor dv = Tensor::empty({1, sl, hkl, dd}, c.dtype);
  Tensor dsinks = Tensor::zeros({c.hq}, DType::kFloat32);
  if (c.sinks) opts.dsinks = dsinks.view();
  sp_attention_backward(c.strategy, g.group, ql.view(), kl.view(), vl.view(), out.view(),
                        dol.view(), lse.view(), dq.view(), dk.view(), dv.view(), opts);
  expect_close("dq", c, rebuild(g, sh, ShardRole::kQuery, dq.view(), {1, s, c.hq, dd}), rb.dq,
               true);
  expect_close("dk", c, rebuild(g, sh, ShardRole::kKeyValue, dk.view(), {1, s, c.hkv, dd}), rb.dk,
               true);
  expect_close("dv", c, rebuild(g, sh, ShardRole::kKeyValue, dv.view(), {1, s, c.hkv, dd}), rb.dv,
               true);
  if (c.sinks) {
    std::vector<double> got(dsinks.data_as<float>(), dsinks.data_as<float>() + c.hq);
    const std::vector<double> want(rb.dsinks.data_as<double>(), rb.dsinks.data_as<double>() + c.hq);
    const auto st = compare(got, want);
    EXPECT_LE(st.rel(), c.dtype == DType::kFloat32 ? 2e-5 : 3e-2)
        << "dsinks max_abs_err " << st.max_abs_err << ": " << describe(c);
  }
}

class SpPacked : public ::testing::TestWithParam<Strategy> {};

int P() {
  return world().size();
}

// Documents of lengths 1, 2P-1, primes, one huge and many tiny.
std::vector<int64_t> mixed_docs() {
  const int64_t p = P();
  return {1, 2 * p - 1, 13, 7, 29, 1, 2, 3, 41};
}

TEST_P(SpPacked, PackedDocumentsCausal) {
  run_case({.strategy = GetParam(), .docs = mixed_docs()});
}

TEST_P(SpPacked, PackedDocumentsNonCausal) {
  run_case({.strategy = GetParam(), .docs = mixed_docs(), .causal = false});
}

TEST_P(SpPacked, OneHugeManyTinyDocuments) {
  run_case({.strategy = GetParam(), .docs = {97, 1, 1, 2, 1, 3, 1, 1}, .hq = 4, .hkv = 1});
}

TEST_P(SpPacked, SlidingWindows) {
  for (int64_t w : {int64_t{0}, int64_t{1}, int64_t{17}, int64_t{200}})
    run_case(
        {.strategy = GetParam(), .docs = mixed_docs(), .wl = w, .wr = 0, .backward = w != 200});
}

TEST_P(SpPacked, TwoSidedWindowNonCausal) {
  run_case({.strategy = GetParam(), .docs = mixed_docs(), .causal = false, .wl = 5, .wr = 3});
}

TEST_P(SpPacked, WindowOnOneSequence) {
  // No documents: the plain layouts with a window (all strategies need S % 2P == 0 here).
  run_case({.strategy = GetParam(), .seq = 24 * P(), .wl = 9, .wr = 0});
}

TEST_P(SpPacked, SinkTokensWithAndWithoutWindow) {
  run_case({.strategy = GetParam(), .docs = mixed_docs(), .sink_tokens = 4});
  run_case({.strategy = GetParam(), .docs = mixed_docs(), .wl = 3, .wr = 0, .sink_tokens = 2});
}

TEST_P(SpPacked, LearnedSinksForwardBackward) {
  run_case({.strategy = GetParam(), .docs = mixed_docs(), .sinks = true});
  run_case({.strategy = GetParam(),
            .docs = mixed_docs(),
            .wl = 6,
            .wr = 0,
            .sink_tokens = 1,
            .sinks = true});
}

TEST_P(SpPacked, ShortDocumentsStayWholeByDefault) {
  run_case({.strategy = GetParam(), .docs = mixed_docs(), .min_chunk = 128});
  run_case({.strategy = GetParam(),
            .docs = mixed_docs(),
            .wl = 4,
            .wr = 0,
            .sink_tokens = 1,
            .sinks = true,
            .min_chunk = 128});
}

TEST_P(SpPacked, Bf16HeadDim128) {
  run_case({.strategy = GetParam(),
            .docs = mixed_docs(),
            .wl = 10,
            .wr = 0,
            .sinks = true,
            .dtype = DType::kBFloat16,
            .hq = 4,
            .hkv = 4,
            .d = 128});
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, SpPacked,
                         ::testing::ValuesIn(all_strategies().begin(), all_strategies().end()),
                         [](const ::testing::TestParamInfo<Strategy>& i) {
                           return std::string(strategy_name(i.param));
                         });

// ---- layout and balance --------------------------------------------------------------------

std::vector<int64_t> longtail(int64_t total, uint64_t seed) {
  return longtail_document_lengths(total, seed);
}

TEST(SpPackedLayout, ShardsCoverEveryTokenOnceAndPositionsRestartPerDocument) {
  const std::vector<int64_t> docs = {5, 1, 12, 3, 2100, 0, 700};
  const std::vector<int32_t> cu = cu_of(docs);
  for (int64_t min_chunk : {int64_t{1}, int64_t{128}})
    for (Strategy s : all_strategies()) {
      Group g = make_group(s);
      std::vector<int> seen(static_cast<size_t>(cu.back()), 0);
      SpShape sh;
      sh.seq = cu.back();
      sh.heads_q = sh.heads_kv = 4;
      sh.cu_seqlens = cu;
      sh.min_split_chunk = min_chunk;
      // Head parallel: every rank holds the whole sequence (count one rank).
      const int ranks = s == Strategy::kHeads ? 1 : g.layout.ranks;
      for (int r = 0; r < ranks; ++r) {
        const auto pos = token_positions(g.layout, cu, r, min_chunk);
        const auto doc = token_documents(g.layout, cu, r, min_chunk);
        ASSERT_EQ(static_cast<int64_t>(pos.size()), local_seq_len(g.layout, sh, r));
        ASSERT_EQ(pos.size(), doc.size());
        for (size_t i = 0; i < pos.size(); ++i) {
          ASSERT_GE(pos[i], 0);
          ASSERT_LT(pos[i], docs[static_cast<size_t>(doc[i])]) << strategy_name(s);
          ++seen[static_cast<size_t>(cu[static_cast<size_t>(doc[i])] + pos[i])];
        }
      }
      for (int n : seen) EXPECT_EQ(n, 1) << strategy_name(s) << " min_chunk " << min_chunk;
    }
}

TEST(SpPackedLayout, LongTailBatchUnderZigzagIsBalancedWithin5Percent) {
  const std::vector<int32_t> cu = cu_of(longtail(32768, 1));
  SpShape sh;
  sh.seq = cu.back();
  sh.heads_q = sh.heads_kv = 8;
  sh.cu_seqlens = cu;
  SpOptions o;
  o.causal = true;
  for (int64_t min_chunk : {int64_t{1}, int64_t{128}})
    for (int p : {2, 3, 4, 8}) {
      sh.min_split_chunk = min_chunk;
      const SpLayout l{Strategy::kZigzag, p, 1};
      std::vector<double> pairs;
      for (int r = 0; r < p; ++r) pairs.push_back(rank_visible_pairs(l, sh, r, o));
      const double mx = *std::max_element(pairs.begin(), pairs.end());
      const double mean = std::accumulate(pairs.begin(), pairs.end(), 0.0) / p;
      EXPECT_LE(mx / mean, 1.05) << "zigzag over " << p << " ranks, " << cu.size() - 1
                                 << " docs, min_chunk " << min_chunk;
    }
}

TEST(SpPackedLayout, MeasuredVisiblePairsEqualTheModel) {
  const std::vector<int32_t> cu = cu_of(mixed_docs());
  Group g = make_group(Strategy::kZigzag);
  SpShape sh;
  sh.seq = cu.back();
  sh.heads_q = 2;
  sh.heads_kv = 1;
  sh.head_dim = 64;
  sh.cu_seqlens = cu;
  const int64_t sl = local_seq_len(g.layout, sh, g.rank);
  Tensor q = Tensor::empty({1, sl, 2, 64}, DType::kFloat32);
  Tensor kv = Tensor::empty({1, sl, 1, 64}, DType::kFloat32);
  fill_test_data(q.view(), 5, 1);
  fill_test_data(kv.view(), 5, 2);
  Tensor out = Tensor::empty({1, sl, 2, 64}, DType::kFloat32);
  Tensor lse = Tensor::empty({1, 2, sl}, DType::kFloat32);
  SpStats st;
  SpOptions o;
  o.causal = true;
  o.cu_seqlens = cu;
  o.stats = &st;
  sp_attention_forward(Strategy::kZigzag, g.group, q.view(), kv.view(), kv.view(), out.view(),
                       lse.view(), o);
  EXPECT_EQ(st.visible_pairs, 2.0 * rank_visible_pairs(g.layout, sh, g.rank, o));
}

TEST(SpPackedLayout, BadCuSeqlensAreRefusedWithTheField) {
  Group g = make_group(Strategy::kZigzag);
  SpShape sh;
  sh.seq = 10;
  sh.cu_seqlens = {0, 6, 4, 10};
  EXPECT_THROW(check_layout(g.layout, sh), Error);
  sh.cu_seqlens = {0, 6, 9};
  try {
    check_layout(g.layout, sh);
    ADD_FAILURE() << "cu_seqlens ending at 9 for 10 tokens was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cu_seqlens"), std::string::npos) << e.what();
  }
}

// ---- window-aware ring ---------------------------------------------------------------------

TEST(SpPackedRing, WindowSkipsStepsAndLedgerBytesEqualTheFormula) {
  const int p = P();
  const int64_t sl = 32, s = sl * p, hkv = 2, d = 64;
  Group g = make_group(Strategy::kRing);
  Tensor q = Tensor::empty({1, sl, 4, d}, DType::kFloat32);
  Tensor k = Tensor::empty({1, sl, hkv, d}, DType::kFloat32);
  Tensor v = Tensor::empty({1, sl, hkv, d}, DType::kFloat32);
  Tensor dout = Tensor::empty({1, sl, 4, d}, DType::kFloat32);
  fill_test_data(q.view(), 9, 1);
  fill_test_data(k.view(), 9, 2);
  fill_test_data(v.view(), 9, 3);
  fill_test_data(dout.view(), 9, 4);
  for (int64_t w : {int64_t{0}, int64_t{5}, sl, sl + 1, s}) {
    // Steps: the last step that still sees a key is ceil(w / sl) (capped at P - 1).
    const int64_t steps = std::min<int64_t>(p, 1 + (w + sl - 1) / sl);
    // Rows of block b that the rank t ahead attends: the last min(sl, w - (t-1)*sl) rows
    // (none when it wraps around: causal). The ring sends each rank exactly those (relaying
    // keeps the superset, which under a causal window is the nearest rank's), and the dK,dV
    // accumulator of block b carries the rows of distance 1 for steps 1..last.
    auto rows = [&](int64_t b, int64_t t) -> int64_t {
      if (b + t >= p) return 0;
      return std::clamp<int64_t>(w - (t - 1) * sl, 0, sl);
    };
    int64_t kv_rows = 0, acc_rows = 0;
    for (int64_t b = 0; b < p; ++b) {
      for (int64_t t = 1; t < steps; ++t) kv_rows += rows(b, t);
      acc_rows += (steps - 1) * rows(b, 1);
    }
    const uint64_t row_bytes = static_cast<uint64_t>(hkv * d * 4) * 2;  // K and V, fp32
    auto total_sent = [&] {
      double n = static_cast<double>(world().ledger().total().bytes_sent);
      world().all_reduce(&n, &n, 1, DType::kFloat64, comm::ReduceOp::kSum);
      return static_cast<uint64_t>(n);
    };
    Tensor out = Tensor::empty({1, sl, 4, d}, DType::kFloat32);
    Tensor lse = Tensor::empty({1, 4, sl}, DType::kFloat32);
    SpStats st;
    SpOptions o;
    o.causal = true;
    o.window_left = w;
    o.window_right = 0;
    o.stats = &st;
    world().ledger().reset();
    sp_attention_forward(Strategy::kRing, g.group, q.view(), k.view(), v.view(), out.view(),
                         lse.view(), o);
    EXPECT_EQ(st.steps, steps) << "window " << w;
    EXPECT_EQ(total_sent(), static_cast<uint64_t>(kv_rows) * row_bytes)
        << "forward, window " << w << ", P " << p;
    Tensor dq = Tensor::empty({1, sl, 4, d}, DType::kFloat32);
    Tensor dk = Tensor::empty({1, sl, hkv, d}, DType::kFloat32);
    Tensor dv = Tensor::empty({1, sl, hkv, d}, DType::kFloat32);
    world().ledger().reset();
    sp_attention_backward(Strategy::kRing, g.group, q.view(), k.view(), v.view(), out.view(),
                          dout.view(), lse.view(), dq.view(), dk.view(), dv.view(), o);
    EXPECT_EQ(total_sent(), static_cast<uint64_t>(kv_rows + acc_rows) * row_bytes)
        << "backward, window " << w << ", P " << p;
    // (Exactness of the window-aware ring: SlidingWindows / WindowOnOneSequence above.)
  }
}

}  // namespace
}  // namespace distattn::parallel
