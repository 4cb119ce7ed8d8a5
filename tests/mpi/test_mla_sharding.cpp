// MLA under mpirun (np 1, 2, 4): exact prefill vs the fp64 reference; MLA-TP, decode-CP,
// TPLA with g = 1 and TPLA with a global softmax all equal exact MLA decode; TPLA's
// per-shard softmax is a (bounded) approximation; cache bytes, memory and communication
// per rank exactly as the formulas.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/parallel/mla.h"

namespace distattn {
namespace {

using parallel::MlaCache;
using parallel::MlaConfig;
using parallel::MlaDecoder;
using parallel::MlaDecodeSetup;
using parallel::MlaSharding;
using parallel::MlaWeights;
using parallel::TplaNorm;
using parallel::TplaRotation;

constexpr int64_t kPrompt = 70, kDecode = 6, kCap = kPrompt + kDecode;
constexpr uint64_t kSeed = 2024;

MlaConfig small_config() {
  MlaConfig c;
  c.hidden = 48;
  c.heads = 8;
  c.q_lora_rank = 24;
  c.kv_lora_rank = 64;
  c.qk_nope = 16;
  c.qk_rope = 16;
  c.v_head = 16;
  c.page_size = 16;
  return c;
}

struct Fixture {
  MlaConfig cfg = small_config();
  std::shared_ptr<comm::Communicator> world;
  MlaWeights weights;
  Tensor x;  // [kCap, hidden]
  parallel::MlaReference ref;
  Fixture() {
    world = comm::create_world(comm::Backend::kMpi, Device::cpu());
    weights = MlaWeights::generate(cfg, kSeed);
    x = Tensor::empty({kCap, cfg.hidden}, DType::kFloat32);
    testing::fill_test_data(x, kSeed, 77);
    ref = parallel::mla_reference_forward(cfg, weights, x.data_as<float>(), kCap);
  }
  std::vector<double> ref_rows(int64_t t0, int64_t n) const {
    return {ref.y.begin() + t0 * cfg.hidden, ref.y.begin() + (t0 + n) * cfg.hidden};
  }
};

Fixture& fx() {
  static Fixture f;
  return f;
}

// Runs prefill + kDecode decode steps; returns the decode outputs [kDecode, hidden].
std::vector<double> run_decode(const MlaDecodeSetup& setup,
                               const parallel::TplaReparam* rp = nullptr) {
  Fixture& f = fx();
  TensorView prompt = f.x.view().slice(0, 0, kPrompt);
  auto pre = parallel::mla_prefill_tp(f.cfg, f.weights, prompt, *f.world, kCap);
  MlaDecoder dec(f.cfg, f.weights, setup, f.world, rp);
  dec.load_prefill(pre.cache);
  std::vector<double> out;
  std::vector<float> y(static_cast<size_t>(f.cfg.hidden));
  for (int64_t t = 0; t < kDecode; ++t) {
    dec.step(f.x.data_as<float>() + (kPrompt + t) * f.cfg.hidden, y.data());
    out.insert(out.end(), y.begin(), y.end());
  }
  return out;
}

MlaDecodeSetup setup_for(MlaSharding s, int groups = 0) {
  MlaDecodeSetup st;
  st.sharding = s;
  st.tpla_groups = groups;
  st.capacity = kCap;
  return st;
}

parallel::TplaReparam reparam_for(int groups, TplaRotation rot) {
  Fixture& f = fx();
  // Calibration: the exact latents of the prompt and the absorbed queries of its tokens.
  std::vector<float> lat(f.ref.latent.begin(), f.ref.latent.begin() + kPrompt * f.cfg.kv_lora_rank);
  auto q = parallel::mla_absorbed_queries(f.cfg, f.weights, f.x.data_as<float>(), 8);
  return parallel::make_tpla_reparam(f.cfg.kv_lora_rank, groups, rot, 5, lat.data(), kPrompt,
                                     q.data(), 8 * f.cfg.heads);
}

TEST(MlaSharding, PrefillMatchesFp64Reference) {
  Fixture& f = fx();
  TensorView prompt = f.x.view().slice(0, 0, kPrompt);
  auto pre = parallel::mla_prefill_tp(f.cfg, f.weights, prompt, *f.world, kCap);
  const auto st = testing::compare(testing::to_double_vector(pre.y), f.ref_rows(0, kPrompt));
  EXPECT_EQ(st.non_finite, 0);
  EXPECT_LT(st.rel(), 2e-5);
  ASSERT_EQ(pre.cache.length(), kPrompt);
  std::vector<double> lat, pe;
  std::vector<float> row(static_cast<size_t>(f.cfg.kv_lora_rank + f.cfg.qk_rope));
  for (int64_t t = 0; t < kPrompt; ++t) {
    pre.cache.read_row(t, row.data());
    lat.insert(lat.end(), row.begin(), row.begin() + f.cfg.kv_lora_rank);
    pe.insert(pe.end(), row.begin() + f.cfg.kv_lora_rank, row.end());
  }
  std::vector<double> rl(f.ref.latent.begin(), f.ref.latent.begin() + kPrompt * f.cfg.kv_lora_rank);
  std::vector<double> rp(f.ref.k_pe.begin(), f.ref.k_pe.begin() + kPrompt * f.cfg.qk_rope);
  EXPECT_LT(testing::compare(lat, rl).rel(), 1e-5);
  EXPECT_LT(testing::compare(pe, rp).rel(), 1e-5);
}

TEST(MlaSharding, MlaTpDecodeMatchesExactMla) {
  const auto got = run_decode(setup_for(MlaSharding::kMlaTp));
  const auto st = testing::compare(got, fx().ref_rows(kPrompt, kDecode));
  EXPECT_EQ(st.non_finite, 0);
  EXPECT_LT(st.rel(), 2e-5);
}

TEST(MlaSharding, DecodeCpMatchesExactMla) {
  const auto got = run_decode(setup_for(MlaSharding::kDecodeCp));
  const auto st = testing::compare(got, fx().ref_rows(kPrompt, kDecode));
  EXPECT_EQ(st.non_finite, 0);
  EXPECT_LT(st.rel(), 2e-5);
}

TEST(MlaSharding, TplaWithOneGroupMatchesExactMlaForEveryRotation) {
  for (auto rot : {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca}) {
    const auto rp = reparam_for(1, rot);
    EXPECT_FLOAT_EQ(rp.mu[0], 1.0f);
    for (auto norm : {TplaNorm::kSliced, TplaNorm::kExact}) {
      auto st = setup_for(MlaSharding::kTpla, 1);
      st.tpla_norm = norm;
      const auto got = run_decode(st, &rp);
      const auto e = testing::compare(got, fx().ref_rows(kPrompt, kDecode));
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_LT(e.rel(), 2e-5) << parallel::rotation_name(rot) << " " << parallel::norm_name(norm);
    }
  }
}

TEST(MlaSharding, TplaRotatedWithGlobalSoftmaxMatchesExactMla) {
  const int p = fx().world->size();
  std::vector<int> gs = {p};
  if (p == 4) gs.push_back(2);  // heads split 2 ways inside each latent group
  for (int g : gs)
    for (auto rot : {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca}) {
      const auto rp = reparam_for(g, rot);
      auto st = setup_for(MlaSharding::kTpla, g);
      st.tpla_norm = TplaNorm::kExact;
      st.tpla_global_softmax = true;
      const auto got = run_decode(st, &rp);
      const auto e = testing::compare(got, fx().ref_rows(kPrompt, kDecode));
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_LT(e.rel(), 2e-5) << "g=" << g << " " << parallel::rotation_name(rot);
    }
}

TEST(MlaSharding, TplaPerShardSoftmaxIsABoundedApproximation) {
  const int p = fx().world->size();
  if (p == 1) GTEST_SKIP() << "one rank: TPLA has a single group and is exact (tested above)";
  std::vector<double> err;
  for (auto rot : {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca}) {
    const auto rp = reparam_for(p, rot);
    auto st = setup_for(MlaSharding::kTpla, p);
    const auto got = run_decode(st, &rp);
    const auto e = testing::compare(got, fx().ref_rows(kPrompt, kDecode));
    EXPECT_EQ(e.non_finite, 0);
    // The per-shard softmax really differs from exact MLA, but stays bounded.
    EXPECT_GT(e.rel(), 1e-5) << parallel::rotation_name(rot);
    EXPECT_LT(e.rel(), 1.0) << parallel::rotation_name(rot);
    err.push_back(e.rel());
  }
  // This model's latents live in a subspace (hidden 48 < kv_lora 64): PCA puts the energy
  // into the first shards and wins clearly over no rotation and Hadamard.
  EXPECT_LT(err[2], 0.5 * err[0]);
  EXPECT_LT(err[2], 0.5 * err[1]);
}

TEST(MlaSharding, TplaDecodeTokensCarrySlicedOrExactRmsNorm) {
  // The cached latent of a decode token on group i: exact = (c U)_i with the full-vector
  // RMSNorm; sliced = (c U)_i renormalized by the slice's own RMS.
  Fixture& f = fx();
  const int p = f.world->size();
  const int64_t dl = f.cfg.kv_lora_rank;
  for (auto norm : {TplaNorm::kSliced, TplaNorm::kExact}) {
    const auto rp = reparam_for(p, TplaRotation::kHadamard);
    auto st = setup_for(MlaSharding::kTpla, p);
    st.tpla_norm = norm;
    TensorView prompt = f.x.view().slice(0, 0, kPrompt);
    auto pre = parallel::mla_prefill_tp(f.cfg, f.weights, prompt, *f.world, kCap);
    MlaDecoder dec(f.cfg, f.weights, st, f.world, &rp);
    dec.load_prefill(pre.cache);
    std::vector<float> y(static_cast<size_t>(f.cfg.hidden));
    for (int64_t t = 0; t < kDecode; ++t)
      dec.step(f.x.data_as<float>() + (kPrompt + t) * f.cfg.hidden, y.data());
    const int64_t w = dl / p, g = dec.group();
    std::vector<float> row(static_cast<size_t>(w + f.cfg.qk_rope));
    double max_err = 0;
    for (int64_t t = kPrompt; t < kCap; ++t) {
      std::vector<double> want(static_cast<size_t>(w), 0.0);
      for (int64_t j = 0; j < w; ++j)
        for (int64_t k = 0; k < dl; ++k)
          want[static_cast<size_t>(j)] += f.ref.latent[static_cast<size_t>(t * dl + k)] *
                                          rp.u[static_cast<size_t>(k * dl + g * w + j)];
      if (norm == TplaNorm::kSliced) {
        double ss = 0;
        for (double v : want) ss += v * v;
        const double inv = 1.0 / std::sqrt(ss / static_cast<double>(w));
        for (double& v : want) v *= inv;
      }
      dec.cache().read_row(t, row.data());
      for (int64_t j = 0; j < w; ++j)
        max_err =
            std::max(max_err, std::abs(row[static_cast<size_t>(j)] - want[static_cast<size_t>(j)]));
    }
    EXPECT_LT(max_err, 1e-4) << parallel::norm_name(norm);
  }
}

TEST(MlaSharding, CacheBytesMemoryAndCommunicationMatchTheFormulas) {
  Fixture& f = fx();
  const int p = f.world->size(), r = f.world->rank();
  TensorView prompt = f.x.view().slice(0, 0, kPrompt);
  auto pre = parallel::mla_prefill_tp(f.cfg, f.weights, prompt, *f.world, kCap);
  const int g = p;
  const auto rp = reparam_for(g, TplaRotation::kHadamard);
  for (auto s : {MlaSharding::kMlaTp, MlaSharding::kTpla, MlaSharding::kDecodeCp}) {
    for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
      auto st = setup_for(s, g);
      st.cache_dtype = dt;
      MlaCache full = pre.cache;
      if (dt == DType::kBFloat16) {  // same tokens, bf16 pages
        full = MlaCache(kCap, f.cfg.page_size, f.cfg.kv_lora_rank, f.cfg.qk_rope, dt);
        std::vector<float> row(static_cast<size_t>(f.cfg.kv_lora_rank + f.cfg.qk_rope));
        for (int64_t t = 0; t < kPrompt; ++t) {
          pre.cache.read_row(t, row.data());
          full.append(row.data(), row.data() + f.cfg.kv_lora_rank, 1);
        }
      }
      MlaDecoder dec(f.cfg, f.weights, st, f.world, &rp);
      // Memory: the reshard allocates exactly the shard's pages (+ page table, length).
      const int64_t mem = MlaDecoder::kv_memory_formula(f.cfg, s, p, g, r, kCap, dt);
      const int64_t before = memory_stats(DeviceType::kCPU).current_bytes;
      MlaCache shard = s == MlaSharding::kTpla
                           ? parallel::reshard_to_tpla(full, rp, dec.group(), kCap)
                       : s == MlaSharding::kDecodeCp
                           ? parallel::reshard_to_decode_cp(full, r, p, kCap)
                           : MlaCache(kCap, f.cfg.page_size, f.cfg.kv_lora_rank, f.cfg.qk_rope, dt);
      const int64_t pages = shard.num_pages();
      EXPECT_EQ(memory_stats(DeviceType::kCPU).current_bytes - before,
                mem + 4 * std::max<int64_t>(pages, 1) + 4)
          << parallel::sharding_name(s);
      EXPECT_EQ(shard.kv_memory_bytes(), mem);
      EXPECT_EQ(static_cast<int64_t>(shard.pages().nbytes()), mem);
      dec.load_prefill(full);
      EXPECT_EQ(dec.cache().kv_memory_bytes(), mem) << parallel::sharding_name(s);

      std::vector<float> y(static_cast<size_t>(f.cfg.hidden));
      for (int64_t t = 0; t < kDecode; ++t) {
        const comm::LedgerEntry ar0 = f.world->ledger()[comm::OpKind::kAllReduce];
        const comm::LedgerEntry ag0 = f.world->ledger()[comm::OpKind::kAllGather];
        dec.step(f.x.data_as<float>() + (kPrompt + t) * f.cfg.hidden, y.data());
        const int64_t len = kPrompt + t + 1;
        // Bytes read by this step's attention = the shard's rows x row width.
        EXPECT_EQ(dec.cache().kv_bytes_read(),
                  MlaDecoder::kv_bytes_read_formula(f.cfg, s, p, g, r, len, dt))
            << parallel::sharding_name(s) << " len " << len;
        const comm::LedgerEntry ar1 = f.world->ledger()[comm::OpKind::kAllReduce];
        const comm::LedgerEntry ag1 = f.world->ledger()[comm::OpKind::kAllGather];
        // One all-reduce of y [hidden] fp32 on the TP communicator, whatever the sharding.
        EXPECT_EQ(ar1.calls - ar0.calls, 1u);
        EXPECT_EQ(ar1.bytes_sent - ar0.bytes_sent,
                  static_cast<uint64_t>(2 * (p - 1) * f.cfg.hidden * 4 / p));
        // decode-CP adds one all-gather of the fp32 partials [H, Dl] + lse [H].
        const uint64_t part = static_cast<uint64_t>(f.cfg.heads * (f.cfg.kv_lora_rank + 1) * 4);
        EXPECT_EQ(ag1.bytes_sent - ag0.bytes_sent,
                  s == MlaSharding::kDecodeCp ? part * static_cast<uint64_t>(p - 1) : 0u);
      }
      // Every token is read by exactly one decode-CP rank; MLA-TP reads 576-wide rows, TPLA
      // (Dl/g + Dr)-wide rows.
      double total = static_cast<double>(dec.cache().kv_bytes_read());
      f.world->all_reduce(&total, &total, 1, DType::kFloat64, comm::ReduceOp::kSum);
      const double row = static_cast<double>((f.cfg.kv_lora_rank + f.cfg.qk_rope) * dtype_size(dt));
      const double want =
          s == MlaSharding::kDecodeCp ? kCap * row
          : s == MlaSharding::kMlaTp
              ? p * kCap * row
              : p * kCap *
                    static_cast<double>((f.cfg.kv_lora_rank / g + f.cfg.qk_rope) * dtype_size(dt));
      EXPECT_EQ(total, want) << parallel::sharding_name(s);
    }
  }
}

TEST(MlaSharding, ReshardingKeepsEveryTokenOnce) {
  Fixture& f = fx();
  const int p = f.world->size();
  TensorView prompt = f.x.view().slice(0, 0, kPrompt);
  auto pre = parallel::mla_prefill_tp(f.cfg, f.weights, prompt, *f.world, kCap);
  const int64_t dl = f.cfg.kv_lora_rank, dr = f.cfg.qk_rope;
  // decode-CP: the shards of all ranks hold each prompt token exactly once, in page order.
  int64_t seen = 0;
  std::vector<float> a(static_cast<size_t>(dl + dr)), b(static_cast<size_t>(dl + dr));
  for (int r = 0; r < p; ++r) {
    MlaCache sh = parallel::reshard_to_decode_cp(pre.cache, r, p, kCap);
    int64_t i = 0;
    for (int64_t pg = r; pg * f.cfg.page_size < kPrompt; pg += p)
      for (int64_t t = pg * f.cfg.page_size; t < std::min((pg + 1) * f.cfg.page_size, kPrompt);
           ++t) {
        pre.cache.read_row(t, a.data());
        sh.read_row(i++, b.data());
        ASSERT_EQ(a, b) << "rank " << r << " token " << t;
      }
    EXPECT_EQ(sh.length(), i);
    seen += sh.length();
  }
  EXPECT_EQ(seen, kPrompt);
  // TPLA: the g slices, concatenated and rotated back (c = c_hat U^T), give the latent.
  for (auto rot : {TplaRotation::kHadamard, TplaRotation::kPca}) {
    const int g = 4;
    const auto rp = reparam_for(g, rot);
    std::vector<MlaCache> shards;
    for (int i = 0; i < g; ++i) shards.push_back(parallel::reshard_to_tpla(pre.cache, rp, i, kCap));
    double max_err = 0;
    for (int64_t t = 0; t < kPrompt; ++t) {
      std::vector<double> chat(static_cast<size_t>(dl));
      for (int i = 0; i < g; ++i) {
        std::vector<float> row(static_cast<size_t>(dl / g + dr));
        shards[static_cast<size_t>(i)].read_row(t, row.data());
        for (int64_t j = 0; j < dl / g; ++j)
          chat[static_cast<size_t>(i * dl / g + j)] = row[static_cast<size_t>(j)];
        pre.cache.read_row(t, a.data());
        for (int64_t j = 0; j < dr; ++j)
          ASSERT_EQ(row[static_cast<size_t>(dl / g + j)], a[static_cast<size_t>(dl + j)]);
      }
      for (int64_t k = 0; k < dl; ++k) {
        double c = 0;
        for (int64_t j = 0; j < dl; ++j)
          c += chat[static_cast<size_t>(j)] * rp.u[static_cast<size_t>(k * dl + j)];
        max_err = std::max(max_err, std::abs(c - a[static_cast<size_t>(k)]));
      }
    }
    EXPECT_LT(max_err, 1e-5) << parallel::rotation_name(rot);
  }
}

TEST(MlaSharding, RejectsBadSetupsBeforeAnyCollective) {
  Fixture& f = fx();
  auto st = setup_for(MlaSharding::kTpla, 3);  // 3 divides neither TP (1/2/4 -> 1 only) nor 64
  const auto rp = reparam_for(1, TplaRotation::kNone);
  EXPECT_THROW(MlaDecoder(f.cfg, f.weights, st, f.world, &rp), Error);
  auto st2 = setup_for(MlaSharding::kTpla, 0);
  EXPECT_THROW(MlaDecoder(f.cfg, f.weights, st2, f.world, nullptr), Error);  // no reparam
  MlaConfig bad = f.cfg;
  bad.qk_rope = 15;
  EXPECT_THROW(bad.validate(), Error);
  auto st3 = setup_for(MlaSharding::kMlaTp);
  st3.capacity = 0;
  EXPECT_THROW(MlaDecoder(f.cfg, f.weights, st3, f.world), Error);
}

}  // namespace
}  // namespace distattn
