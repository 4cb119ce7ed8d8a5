// The serving engines under mpirun (np 2, 3, 4; np 1 has no room for two groups and skips):
// disaggregated decode equals the single-rank reference (teacher forcing) for the exact
// shardings, colocated equals it too and produces the same tokens, a request's outputs do
// not depend on the batch, KV bytes per decode rank equal the formulas, a handshake mismatch
// fails before any KV byte, and each injected fault fails exactly its request on both sides
// while the others complete and no page is left behind.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>

#include "distattn/comm/communicator.h"
#include "distattn/serving/engine.h"
#include "distattn/serving/transfer.h"

namespace distattn::serving {
namespace {

std::shared_ptr<comm::Communicator> world() {
  static std::shared_ptr<comm::Communicator> w =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  return w;
}

EngineOptions small(ModelFamily family, int p, int d) {
  EngineOptions o;
  o.model = ModelConfig::defaults(family);
  ModelConfig& m = o.model;
  m.hidden = 128;
  m.layers = 2;
  m.ffn = 256;
  m.vocab = 256;
  m.seed = 3;
  if (family == ModelFamily::kGqa) {
    m.heads = 4;
    m.kv_heads = 2;
    m.head_dim = 16;
  } else {
    m.heads = 4;
    m.mla_latent = 64;
    m.mla_rope = 16;
    m.mla_nope = 16;
    m.mla_v = 16;
  }
  o.prefill.ranks = p;
  o.decode.layout.ranks = d;
  o.decode.layout.sharding =
      family == ModelFamily::kGqa ? DecodeSharding::kHeads : DecodeSharding::kMlaTp;
  o.decode.page_size = 4;
  o.decode.calib_tokens = 32;
  o.kv_pages = 64;
  o.max_batch = 8;
  o.progress = false;
  o.check = true;
  return o;
}

WorkloadSpec small_load(int64_t n = 5) {
  WorkloadSpec s;
  s.requests = n;
  s.rate = std::numeric_limits<double>::infinity();
  s.input_len = 20;
  s.output_len = 4;
  s.range_ratio = 0.5;
  s.seed = 7;
  return s;
}

struct Run {
  RunResult r;
  bool ok = false;
};

// Runs `opts` on every rank (collective) and returns world rank 0's result.
RunResult disagg(const EngineOptions& opts, const WorkloadSpec& spec = small_load()) {
  return run_disaggregated(*world(), opts, make_workload(spec), spec, Slo{});
}

// Checks that only rank 0 can make (metrics live there); every rank runs the same calls.
void expect_exact(const RunResult& r, int64_t requests, const std::string& what) {
  if (world()->rank() != 0) return;
  EXPECT_EQ(r.metrics.completed, requests) << what;
  EXPECT_EQ(r.metrics.failed, 0) << what;
  EXPECT_LE(r.metrics.max_rel_err, 1e-4) << what;
  EXPECT_EQ(r.metrics.kv_pages_leaked, 0) << what;
}

// Bytes each decode rank received through the KV channel: the plan's formula plus one
// 32-byte header per message.
void expect_formula_bytes(const RunResult& r, const EngineOptions& o, const WorkloadSpec& spec) {
  if (world()->rank() != 0) return;
  const KvGeometry g = o.model.geometry(o.decode.page_size);
  ASSERT_EQ(r.kv_bytes_received.size(), static_cast<size_t>(o.decode.layout.ranks));
  for (int j = 0; j < o.decode.layout.ranks; ++j) {
    int64_t want = 0;
    for (const Request& q : make_workload(spec)) {
      const TransferPlan plan = make_transfer_plan(g, o.prefill, o.decode.layout, q.input_len);
      want += expected_bytes_to(g, o.decode.layout, j, q.input_len);
      for (int64_t l = 0; l < g.layers; ++l)
        for (int i = 0; i < o.prefill.ranks; ++i)
          if (!plan.message(l, i, j).empty()) want += static_cast<int64_t>(sizeof(MessageHeader));
    }
    EXPECT_EQ(r.kv_bytes_received[static_cast<size_t>(j)], want) << "decode rank " << j;
  }
}

#define SKIP_AT_ONE_RANK() \
  if (world()->size() < 2) GTEST_SKIP() << "two groups need at least two ranks"

TEST(Serving, DisaggregatedGqaMatchesTheSingleRankReferenceForEveryPrefillAndDecodeSharding) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  for (int p = 1; p < n; ++p)
    for (PrefillSharding ps : {PrefillSharding::kHeads, PrefillSharding::kZigzag,
                               PrefillSharding::kUlysses, PrefillSharding::kHybrid})
      for (DecodeSharding ds : {DecodeSharding::kHeads, DecodeSharding::kDecodeCp}) {
        if (ps == PrefillSharding::kHybrid && p % 2 != 0) continue;
        const int d = n - p;
        // Head-parallel decode needs whole GQA groups per rank (4 heads, 2 KV heads).
        if (ds == DecodeSharding::kHeads && 4 % d != 0) continue;
        EngineOptions o = small(ModelFamily::kGqa, p, d);
        o.prefill.sharding = ps;
        o.prefill.ulysses = ps == PrefillSharding::kHybrid ? 2 : 1;
        o.decode.layout.sharding = ds;
        const std::string what = std::string(prefill_sharding_name(ps)) + " " + std::to_string(p) +
                                 " -> " + decode_sharding_name(ds) + " " + std::to_string(d);
        const RunResult r = disagg(o);
        expect_exact(r, 5, what);
        expect_formula_bytes(r, o, small_load());
      }
}

TEST(Serving, DisaggregatedMlaMatchesTheReferenceAndTplaReceivesItsSliceOnly) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  const int p = 1, d = n - 1;
  for (DecodeSharding ds :
       {DecodeSharding::kMlaTp, DecodeSharding::kDecodeCp, DecodeSharding::kTpla}) {
    if (4 % d != 0) continue;
    EngineOptions o = small(ModelFamily::kMla, p, d);
    o.decode.layout.sharding = ds;
    o.decode.rotation = parallel::TplaRotation::kHadamard;
    const RunResult r = disagg(o);
    expect_formula_bytes(r, o, small_load());
    if (world()->rank() != 0) continue;
    EXPECT_EQ(r.metrics.completed, 5);
    EXPECT_EQ(r.metrics.kv_pages_leaked, 0);
    // TPLA with g = D > 1 is an approximation: it reports its error. g = 1 is exact.
    if (ds != DecodeSharding::kTpla || d == 1)
      EXPECT_LE(r.metrics.max_rel_err, 1e-4) << decode_sharding_name(ds);
    else
      EXPECT_TRUE(std::isfinite(r.metrics.max_rel_err));
  }
}

TEST(Serving, ColocatedMatchesTheReferenceAndTheDisaggregatedTokens) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  EngineOptions o = small(ModelFamily::kGqa, n / 2, n - n / 2);
  if (4 % (n - n / 2) != 0 || 4 % n != 0) GTEST_SKIP() << "heads must split over the ranks";
  const WorkloadSpec spec = small_load();
  const std::vector<Request> wl = make_workload(spec);
  const RunResult a = run_disaggregated(*world(), o, wl, spec, Slo{});
  const RunResult b = run_colocated(*world(), o, wl, spec, Slo{});
  expect_exact(a, 5, "disagg");
  expect_exact(b, 5, "colocated");
  if (world()->rank() != 0) return;
  ASSERT_EQ(a.records.size(), b.records.size());
  for (size_t i = 0; i < a.records.size(); ++i)
    EXPECT_EQ(a.records[i].tokens, b.records[i].tokens) << "request " << i;
}

TEST(Serving, ARequestsOutputsDoNotDependOnWhatElseIsInTheBatch) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  EngineOptions o = small(ModelFamily::kGqa, 1, n - 1);
  if (4 % (n - 1) != 0) o.decode.layout.sharding = DecodeSharding::kDecodeCp;
  const WorkloadSpec spec = small_load(6);
  o.max_batch = 1;
  const RunResult one = disagg(o, spec);
  o.max_batch = 6;
  const RunResult six = disagg(o, spec);
  if (world()->rank() != 0) return;
  for (size_t i = 0; i < one.records.size(); ++i) {
    const RequestRecord &x = one.records[i], &y = six.records[i];
    EXPECT_EQ(x.tokens, y.tokens) << "request " << i;
    ASSERT_EQ(x.hidden.size(), y.hidden.size());
    double err = 0, mx = 0;
    for (size_t j = 0; j < x.hidden.size(); ++j) {
      err = std::max(err, static_cast<double>(std::abs(x.hidden[j] - y.hidden[j])));
      mx = std::max(mx, static_cast<double>(std::abs(x.hidden[j])));
    }
    EXPECT_LE(err, 1e-5 * mx) << "request " << i;
  }
}

TEST(Serving, AHandshakeMismatchNamesTheFieldAndBothValuesBeforeAnyKvByte) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  for (const char* field : {"page_size", "dtype", "layers", "hidden", "decode_ranks",
                            "prefill_ranks", "protocol_version", "kv_heads"}) {
    EngineOptions o = small(ModelFamily::kGqa, 1, n - 1);
    o.decode.layout.sharding = DecodeSharding::kDecodeCp;
    o.faults.push_back(parse_fault(std::string("handshake:") + field));
    try {
      disagg(o);
      ADD_FAILURE() << "a " << field << " mismatch was accepted";
    } catch (const HandshakeError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(std::string(field) + " is "), std::string::npos) << m;
      EXPECT_NE(m.find("on the prefill side but"), std::string::npos) << m;
      EXPECT_EQ(e.kv_bytes(), 0) << field;
    }
  }
  // TPLA: the rotation id.
  EngineOptions o = small(ModelFamily::kMla, 1, n - 1);
  o.decode.layout.sharding = DecodeSharding::kTpla;
  o.decode.layout.tpla_groups = 1;  // valid for any decode rank count
  o.faults.push_back(parse_fault("handshake:tpla_rotation_id"));
  try {
    disagg(o);
    ADD_FAILURE() << "a TPLA rotation mismatch was accepted";
  } catch (const HandshakeError& e) {
    EXPECT_NE(std::string(e.what()).find("tpla_rotation_id"), std::string::npos);
    EXPECT_EQ(e.kv_bytes(), 0);
  }
}

// One request fails on both sides with `reason`, the others complete, nothing leaks.
void expect_one_failure(const RunResult& r, int64_t id, const std::string& reason, int64_t n) {
  if (world()->rank() != 0) return;
  EXPECT_EQ(r.metrics.completed, n - 1);
  EXPECT_EQ(r.metrics.failed, 1);
  EXPECT_EQ(r.metrics.kv_pages_leaked, 0);
  EXPECT_LE(r.metrics.max_rel_err, 1e-4);  // the completed requests are still exact
  ASSERT_GT(r.records.size(), static_cast<size_t>(id));
  EXPECT_FALSE(r.records[static_cast<size_t>(id)].completed);
  EXPECT_NE(r.records[static_cast<size_t>(id)].reason.find(reason), std::string::npos)
      << r.records[static_cast<size_t>(id)].reason;
  EXPECT_GE(r.prefill_failures_seen, 1) << "the prefill side did not record the failure";
  EXPECT_GE(r.decode_failures_seen, 1) << "the decode side did not record the failure";
}

TEST(Serving, ARefusingDecodeRankFailsThatRequestAfterTheAdmissionTimeout) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  EngineOptions o = small(ModelFamily::kGqa, 1, n - 1);
  o.decode.layout.sharding = DecodeSharding::kDecodeCp;
  o.admission_timeout_s = 0.3;
  o.faults.push_back(parse_fault("refuse:1"));
  expect_one_failure(disagg(o), 1, "no room for", 5);
}

TEST(Serving, ADroppedCompletionFailsThatRequestAfterTheKvTimeout) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  EngineOptions o = small(ModelFamily::kGqa, 1, n - 1);
  o.decode.layout.sharding = DecodeSharding::kDecodeCp;
  o.kv_timeout_s = 0.5;
  o.faults.push_back(parse_fault("drop-completion:2"));
  expect_one_failure(disagg(o), 2, "did not arrive within 500 ms", 5);
}

TEST(Serving, APrefillRankThrowingMidRequestFailsOnlyThatRequest) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  const int p = n >= 3 ? 2 : 1;  // with two prefill ranks, the non-leader throws
  EngineOptions o = small(ModelFamily::kGqa, p, n - p);
  o.prefill.sharding = p == 2 ? PrefillSharding::kZigzag : PrefillSharding::kHeads;
  o.decode.layout.sharding = DecodeSharding::kDecodeCp;
  o.faults.push_back(parse_fault("prefill-throw:3:" + std::to_string(p - 1) + ":1"));
  expect_one_failure(disagg(o), 3, "prefill rank " + std::to_string(p - 1) + " failed in layer 1",
                     5);
}

TEST(Serving, AFullPoolMakesRequestsWaitNotFailAndATooLargeOneIsRefusedAtOnce) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  EngineOptions o = small(ModelFamily::kGqa, 1, n - 1);
  o.decode.layout.sharding = DecodeSharding::kDecodeCp;
  o.kv_pages = 12;  // room for about two requests at a time
  const RunResult r = disagg(o, small_load(6));
  expect_exact(r, 6, "small pool");
  WorkloadSpec big = small_load(3);
  big.input_len = 400;
  big.range_ratio = 0;
  const RunResult t = disagg(o, big);
  if (world()->rank() != 0) return;
  EXPECT_EQ(t.metrics.failed, 3);
  EXPECT_EQ(t.metrics.kv_pages_leaked, 0);
  EXPECT_NE(t.records[0].reason.find("pages per decode rank but --kv-pages is 12"),
            std::string::npos)
      << t.records[0].reason;
}

TEST(Serving, BadOptionsAreRejectedNamingTheFlag) {
  SKIP_AT_ONE_RANK();
  const int n = world()->size();
  auto msg = [&](const EngineOptions& o) {
    try {
      validate(o, n);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EngineOptions o = small(ModelFamily::kGqa, 1, n);  // P + D = n + 1
  EXPECT_NE(msg(o).find("must equal the world size"), std::string::npos);
  o = small(ModelFamily::kMla, 1, n - 1);
  o.decode.layout.sharding = DecodeSharding::kHeads;
  EXPECT_NE(msg(o).find("mla-tp, tpla or decode-cp"), std::string::npos);
  o = small(ModelFamily::kGqa, 1, n - 1);
  o.kv_pages = 0;
  EXPECT_NE(msg(o).find("--kv-pages"), std::string::npos);
  EXPECT_THROW(parse_fault("explode:1"), Error);
  EXPECT_THROW(parse_fault("refuse:x"), Error);
}

}  // namespace
}  // namespace distattn::serving
