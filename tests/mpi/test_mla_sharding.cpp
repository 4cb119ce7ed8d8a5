// MLA under mpirun (np 1, 2, 4): exact prefill vs the fp64 reference; MLA-TP, decode-CP,
// TPLA with g = 1 and TPLA with a global softmax all equal exact MLA decode; TPLA's
// per-shard softmax is a (bounded) approximation; cache bytes, memory and communication
// per rank exactly as the formulas.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
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
  MlaConfig cfg;
  std::shared_ptr<comm::Communicator> world;
  MlaWeights weights;
  Tensor x;  // [kCap, hidden]
  parallel::MlaReference ref;
  explicit Fixture(const MlaConfig& c = small_config()) : cfg(c) {
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

// hidden 96 > kv_lora 64: the latents span the whole latent space. (In fx() they span a
// 48-dim subspace; PCA's last components are then rounding noise, and the sliced RMSNorm of a
// slice made only of them, at g = 4, normalizes that noise: fp32 and fp64 legitimately differ.)
Fixture& fx_full_rank() {
  static Fixture f([] {
    MlaConfig c = small_config();
    c.hidden = 96;
    return c;
  }());
  return f;
}

// Runs prefill + kDecode decode steps; returns the decode outputs [kDecode, hidden].
// `tp` defaults to the world.
std::vector<double> run_decode(const MlaDecodeSetup& setup,
                               const parallel::TplaReparam* rp = nullptr,
                               std::shared_ptr<comm::Communicator> tp = nullptr,
                               Fixture& f = fx()) {
  if (!tp) tp = f.world;
  TensorView prompt = f.x.view().slice(0, 0, kPrompt);
  auto pre = parallel::mla_prefill_tp(f.cfg, f.weights, prompt, *tp, kCap);
  MlaDecoder dec(f.cfg, f.weights, setup, tp, rp);
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

parallel::TplaReparam reparam_for(int groups, TplaRotation rot, Fixture& f = fx()) {
  // Calibration: the exact latents of the prompt and the absorbed queries of all its tokens
  // (every head: kPrompt * heads queries).
  std::vector<float> lat(f.ref.latent.begin(), f.ref.latent.begin() + kPrompt * f.cfg.kv_lora_rank);
  auto q = parallel::mla_absorbed_queries(f.cfg, f.weights, f.x.data_as<float>(), kPrompt);
  return parallel::make_tpla_reparam(f.cfg.kv_lora_rank, groups, rot, 5, lat.data(), kPrompt,
                                     q.data(), kPrompt * f.cfg.heads);
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

// Independent fp64 TPLA decode (docs/MLA.md, REFERENCE.md section 5), straight from the
// full weights: q_lat[h] = q_nope[h] W_UK[h] diag(gamma), q_hat = q_lat U; latent c_hat = c U
// (prompt tokens and exact-RMSNorm decode tokens: the full-vector normalized latent; sliced
// decode tokens: each slice of (x W_DKV) U normalized by its own RMS); shard i:
// s_i[t] = mu_i scale q_hat_i . c_hat_i[t] + scale q_pe . k_pe[t], P_i = softmax(s_i),
// O_i = P_i c_hat_i, o[h] = sum_i W_UV[h] diag(gamma) U[:, slice i] O_i (no 1/g),
// y = sum_h o[h] W_O[h]. Returns the decode outputs [kDecode, hidden].
std::vector<double> tpla_fp64(const Fixture& f, const parallel::TplaReparam& rp, TplaNorm norm) {
  const MlaConfig& c = f.cfg;
  const int64_t H = c.heads, nope = c.qk_nope, rope = c.qk_rope, dv = c.v_head, hid = c.hidden;
  const int64_t dl = c.kv_lora_rank, q_in = c.q_lora_rank, g = rp.groups, w = dl / g;
  const double eps = c.rms_eps, scale = c.scale();
  const float* gamma = f.weights.gamma.data_as<float>();
  auto vec_mat = [](const std::vector<double>& v, const float* m, int64_t cols) {
    std::vector<double> out(static_cast<size_t>(cols), 0.0);
    for (size_t i = 0; i < v.size(); ++i)
      for (int64_t j = 0; j < cols; ++j)
        out[static_cast<size_t>(j)] += v[i] * m[static_cast<int64_t>(i) * cols + j];
    return out;
  };
  auto rms_normalize = [eps](double* v, int64_t d) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += v[i] * v[i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + eps);
    for (int64_t i = 0; i < d; ++i) v[i] *= inv;
  };
  auto rope_at = [&](double* v, int64_t pos) {  // half-split RoPE, as in mla.h
    for (int64_t i = 0; i < rope / 2; ++i) {
      const double ang =
          static_cast<double>(pos) * std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / rope);
      const double a = v[i], b = v[i + rope / 2];
      v[i] = a * std::cos(ang) - b * std::sin(ang);
      v[i + rope / 2] = a * std::sin(ang) + b * std::cos(ang);
    }
  };
  auto rotate = [&](const double* v) {  // v U
    std::vector<double> out(static_cast<size_t>(dl), 0.0);
    for (int64_t k = 0; k < dl; ++k)
      for (int64_t j = 0; j < dl; ++j)
        out[static_cast<size_t>(j)] += v[k] * rp.u[static_cast<size_t>(k * dl + j)];
    return out;
  };
  std::vector<double> chat(static_cast<size_t>(kCap * dl)), kpe(static_cast<size_t>(kCap * rope));
  for (int64_t t = 0; t < kCap; ++t) {
    std::vector<double> xt(f.x.data_as<float>() + t * hid, f.x.data_as<float>() + (t + 1) * hid);
    std::vector<double> lat = vec_mat(xt, f.weights.w_dkv.data_as<float>(), dl);
    const bool sliced = norm == TplaNorm::kSliced && t >= kPrompt;
    if (!sliced) rms_normalize(lat.data(), dl);
    std::vector<double> r = rotate(lat.data());
    if (sliced)
      for (int64_t i = 0; i < g; ++i) rms_normalize(r.data() + i * w, w);
    std::copy(r.begin(), r.end(), chat.begin() + t * dl);
    std::vector<double> kr = vec_mat(xt, f.weights.w_kr.data_as<float>(), rope);
    rope_at(kr.data(), t);
    std::copy(kr.begin(), kr.end(), kpe.begin() + t * rope);
  }
  // Guards the reference itself: its latents and RoPE'd keys agree with the exact model's.
  std::vector<double> kpe_ref(f.ref.k_pe.begin(), f.ref.k_pe.begin() + kCap * rope);
  EXPECT_LT(testing::compare(kpe, kpe_ref).rel(), 1e-12);

  std::vector<double> y(static_cast<size_t>(kDecode * hid), 0.0);
  for (int64_t s = 0; s < kDecode; ++s) {
    const int64_t pos = kPrompt + s, len = pos + 1;
    std::vector<double> xt(f.x.data_as<float>() + pos * hid,
                           f.x.data_as<float>() + (pos + 1) * hid);
    std::vector<double> cq = vec_mat(xt, f.weights.w_dq.data_as<float>(), q_in);
    rms_normalize(cq.data(), q_in);
    const std::vector<double> qn = vec_mat(cq, f.weights.w_uq.data_as<float>(), H * nope);
    const std::vector<double> qr = vec_mat(cq, f.weights.w_qr.data_as<float>(), H * rope);
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> qlat(static_cast<size_t>(dl), 0.0);
      for (int64_t i = 0; i < nope; ++i)
        for (int64_t j = 0; j < dl; ++j)
          qlat[static_cast<size_t>(j)] += qn[static_cast<size_t>(h * nope + i)] *
                                          f.weights.w_uk.data_as<float>()[(h * nope + i) * dl + j];
      for (int64_t j = 0; j < dl; ++j) qlat[static_cast<size_t>(j)] *= gamma[j];
      const std::vector<double> qhat = rotate(qlat.data());
      std::vector<double> qpe(qr.begin() + h * rope, qr.begin() + (h + 1) * rope);
      rope_at(qpe.data(), pos);
      std::vector<double> o(static_cast<size_t>(dv), 0.0);
      for (int64_t i = 0; i < g; ++i) {
        const double mu = rp.mu[static_cast<size_t>(i)];
        std::vector<double> sc(static_cast<size_t>(len));
        double mx = -INFINITY;
        for (int64_t t = 0; t < len; ++t) {
          double a = 0, b = 0;
          for (int64_t j = i * w; j < (i + 1) * w; ++j)
            a += qhat[static_cast<size_t>(j)] * chat[static_cast<size_t>(t * dl + j)];
          for (int64_t j = 0; j < rope; ++j)
            b += qpe[static_cast<size_t>(j)] * kpe[static_cast<size_t>(t * rope + j)];
          sc[static_cast<size_t>(t)] = mu * scale * a + scale * b;
          mx = std::max(mx, sc[static_cast<size_t>(t)]);
        }
        double l = 0;
        for (double& v : sc) l += (v = std::exp(v - mx));
        std::vector<double> oi(static_cast<size_t>(w), 0.0);
        for (int64_t t = 0; t < len; ++t)
          for (int64_t j = 0; j < w; ++j)
            oi[static_cast<size_t>(j)] +=
                sc[static_cast<size_t>(t)] / l * chat[static_cast<size_t>(t * dl + i * w + j)];
        // O_i back through W_UV[h] diag(gamma) U[:, slice i].
        for (int64_t k = 0; k < dl; ++k) {
          double z = 0;
          for (int64_t j = 0; j < w; ++j)
            z += rp.u[static_cast<size_t>(k * dl + i * w + j)] * oi[static_cast<size_t>(j)];
          z *= gamma[k];
          for (int64_t e = 0; e < dv; ++e)
            o[static_cast<size_t>(e)] += f.weights.w_uv.data_as<float>()[(h * dv + e) * dl + k] * z;
        }
      }
      for (int64_t e = 0; e < dv; ++e)
        for (int64_t j = 0; j < hid; ++j)
          y[static_cast<size_t>(s * hid + j)] +=
              o[static_cast<size_t>(e)] * f.weights.w_o.data_as<float>()[(h * dv + e) * hid + j];
    }
  }
  return y;
}

TEST(MlaSharding, TplaPerShardSoftmaxMatchesIndependentFp64Tpla) {
  // The real per-shard-softmax decode path against tpla_fp64, for every group count that
  // divides TP (g < TP: heads split TP/g ways inside each latent group), rotation and
  // RMSNorm mode, with the mu values the decoder uses.
  Fixture& f = fx_full_rank();
  const int p = f.world->size();
  for (int g = 1; g <= p; g *= 2)
    for (auto rot : {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca}) {
      const auto rp = reparam_for(g, rot, f);
      for (auto norm : {TplaNorm::kSliced, TplaNorm::kExact}) {
        auto st = setup_for(MlaSharding::kTpla, g);
        st.tpla_norm = norm;
        const auto got = run_decode(st, &rp, f.world, f);
        const auto want = tpla_fp64(f, rp, norm);
        const auto e = testing::compare(got, want);
        const std::string what = "g=" + std::to_string(g) + " " + parallel::rotation_name(rot) +
                                 " " + parallel::norm_name(norm);
        EXPECT_EQ(e.non_finite, 0) << what;
        EXPECT_LT(e.rel(), 2e-5) << what;
        if (g > 1) {  // and it is not exact MLA: the check above is not the exact path's
          EXPECT_GT(testing::compare(want, f.ref_rows(kPrompt, kDecode)).rel(), 1e-4) << what;
        }
      }
    }
}

TEST(MlaSharding, TplaTwoGroupsGiveTheSameOutputAtTp2AndTp4) {
  // g = 2 at TP = 4 (heads split 2 ways inside each latent group) vs g = 2 at TP = 2 (each
  // half of the world alone): the same TPLA computation, so the same output.
  Fixture& f = fx_full_rank();
  if (f.world->size() != 4) GTEST_SKIP() << "needs 4 ranks";
  std::shared_ptr<comm::Communicator> half = f.world->split(f.world->rank() / 2, f.world->rank());
  ASSERT_EQ(half->size(), 2);
  for (auto rot : {TplaRotation::kNone, TplaRotation::kHadamard, TplaRotation::kPca}) {
    const auto rp = reparam_for(2, rot, f);
    for (auto norm : {TplaNorm::kSliced, TplaNorm::kExact}) {
      auto st = setup_for(MlaSharding::kTpla, 2);
      st.tpla_norm = norm;
      const auto tp4 = run_decode(st, &rp, f.world, f);
      const auto tp2 = run_decode(st, &rp, half, f);
      const auto e = testing::compare(tp4, tp2);
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_LT(e.rel(), 1e-5) << parallel::rotation_name(rot) << " " << parallel::norm_name(norm);
    }
  }
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
