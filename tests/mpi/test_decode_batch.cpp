// Batched decode under mpirun (np 1, 2, 4): decode-CP over a paged GQA cache equals one
// rank's paged decode (pages dealt round-robin, some ranks holding no token of a sequence),
// and the batched MLA decode step (parallel::mla_decode_step) equals MlaDecoder's
// one-sequence step for every sharding, sequences of different lengths in one batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/ops/attention.h"
#include "distattn/parallel/decode_cp.h"
#include "distattn/parallel/mla.h"

namespace distattn {
namespace {

std::shared_ptr<comm::Communicator> world() {
  static std::shared_ptr<comm::Communicator> w =
      comm::create_world(comm::Backend::kMpi, Device::cpu());
  return w;
}

TEST(DecodeCp, PagedGqaDecodeMatchesOneRankOverEveryPage) {
  comm::Communicator& w = *world();
  const int p = w.size(), r = w.rank();
  const int64_t hq = 8, hkv = 2, d = 32, ps = 8;
  const std::vector<int64_t> lens = {1, 37, 100};  // len 1: only rank 0 holds a token
  const int64_t b = static_cast<int64_t>(lens.size());
  int64_t max_pages = 0, total_pages = 0;
  for (int64_t l : lens) {
    max_pages = std::max(max_pages, (l + ps - 1) / ps);
    total_pages += (l + ps - 1) / ps;
  }
  // The whole cache (every rank builds it; values from (seed, id, index)).
  Tensor k_all = Tensor::empty({total_pages, ps, hkv, d}, DType::kFloat32);
  Tensor v_all = Tensor::empty({total_pages, ps, hkv, d}, DType::kFloat32);
  testing::fill_test_data(k_all, 5, 1);
  testing::fill_test_data(v_all, 5, 2);
  Tensor q = Tensor::empty({b, 1, hq, d}, DType::kFloat32);
  testing::fill_test_data(q, 5, 3);
  Tensor table_all = Tensor::zeros({b, max_pages}, DType::kInt32);
  Tensor lens_all = Tensor::empty({b}, DType::kInt32);
  // Local: sequence page i on rank i % p, at local page index i / p; pages of this rank
  // copied out of the whole cache.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> mine(static_cast<size_t>(b));  // (i, id)
  int64_t next = 0, local_pages = 0;
  for (int64_t s = 0; s < b; ++s) {
    const int64_t np = (lens[s] + ps - 1) / ps;
    for (int64_t i = 0; i < np; ++i) {
      table_all.data_as<int32_t>()[s * max_pages + i] = static_cast<int32_t>(next + i);
      if (i % p == r) mine[static_cast<size_t>(s)].push_back({i, next + i});
    }
    next += np;
    lens_all.data_as<int32_t>()[s] = static_cast<int32_t>(lens[s]);
    local_pages += static_cast<int64_t>(mine[static_cast<size_t>(s)].size());
  }
  Tensor k_loc = Tensor::zeros({std::max<int64_t>(local_pages, 1), ps, hkv, d}, DType::kFloat32);
  Tensor v_loc = Tensor::zeros({std::max<int64_t>(local_pages, 1), ps, hkv, d}, DType::kFloat32);
  Tensor table_loc = Tensor::zeros({b, max_pages}, DType::kInt32);
  Tensor lens_loc = Tensor::empty({b}, DType::kInt32);
  const int64_t page_elems = ps * hkv * d;
  int64_t slot = 0;
  for (int64_t s = 0; s < b; ++s) {
    int64_t held = 0;
    const auto& pg = mine[static_cast<size_t>(s)];
    for (size_t j = 0; j < pg.size(); ++j, ++slot) {
      const auto [seq_page, id] = pg[j];
      std::copy_n(k_all.data_as<float>() + id * page_elems, page_elems,
                  k_loc.data_as<float>() + slot * page_elems);
      std::copy_n(v_all.data_as<float>() + id * page_elems, page_elems,
                  v_loc.data_as<float>() + slot * page_elems);
      table_loc.data_as<int32_t>()[s * max_pages + static_cast<int64_t>(j)] =
          static_cast<int32_t>(slot);
      held += std::min(ps, lens[s] - seq_page * ps);
    }
    lens_loc.data_as<int32_t>()[s] = static_cast<int32_t>(held);
  }
  Tensor out = Tensor::empty({b, 1, hq, d}, DType::kFloat32);
  Tensor lse = Tensor::empty({b, hq, 1}, DType::kFloat32);
  parallel::paged_decode_cp_attention(w, q, {k_loc, v_loc, table_loc, lens_loc}, out, lse);
  Tensor ref_out = Tensor::empty({b, 1, hq, d}, DType::kFloat32);
  Tensor ref_lse = Tensor::empty({b, hq, 1}, DType::kFloat32);
  ops::attention_decode_paged(q, {k_all, v_all, table_all, lens_all}, ref_out, ref_lse);
  const auto e =
      testing::compare(testing::to_double_vector(out), testing::to_double_vector(ref_out));
  const auto el =
      testing::compare(testing::to_double_vector(lse), testing::to_double_vector(ref_lse));
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_LT(e.rel(), 1e-5);
  EXPECT_LT(el.max_abs_err, 1e-5);
}

// ---- MLA: the batched step against MlaDecoder -----------------------------------------------

parallel::MlaConfig mla_config() {
  parallel::MlaConfig c;
  c.hidden = 64;
  c.heads = 4;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 64;
  c.qk_nope = 16;
  c.qk_rope = 16;
  c.v_head = 16;
  c.page_size = 8;
  return c;
}

void batch_matches_decoder(parallel::MlaSharding sharding, parallel::TplaNorm norm) {
  std::shared_ptr<comm::Communicator> tp = world();
  const int p = tp->size(), r = tp->rank();
  const parallel::MlaConfig cfg = mla_config();
  const parallel::MlaWeights w = parallel::MlaWeights::generate(cfg, 11);
  const std::vector<int64_t> prompts = {5, 19};  // two sequences of different lengths
  const int64_t steps = 3, b = static_cast<int64_t>(prompts.size()), hid = cfg.hidden;
  const int64_t cap = 32, ps = cfg.page_size;
  parallel::MlaDecodeSetup setup;
  setup.sharding = sharding;
  setup.tpla_norm = norm;
  setup.capacity = cap;
  // TPLA with a Hadamard rotation calibrated on random latents and queries.
  std::vector<float> lat(64 * 64), qlat(64 * 64);
  for (size_t i = 0; i < lat.size(); ++i) {
    lat[i] = static_cast<float>(testing::test_value(3, 1, i));
    qlat[i] = static_cast<float>(testing::test_value(3, 2, i));
  }
  const parallel::TplaReparam rp = parallel::make_tpla_reparam(
      cfg.kv_lora_rank, p, parallel::TplaRotation::kHadamard, 9, lat.data(), 64, qlat.data(), 64);
  const parallel::TplaReparam* rpp = sharding == parallel::MlaSharding::kTpla ? &rp : nullptr;

  // Inputs: the prompt rows, then `steps` decode rows per sequence.
  std::vector<Tensor> xs;
  for (int64_t s = 0; s < b; ++s) {
    Tensor x = Tensor::empty({prompts[s] + steps, hid}, DType::kFloat32);
    testing::fill_test_data(x, 21, static_cast<uint64_t>(s));
    xs.push_back(x);
  }
  // Reference: one MlaDecoder per sequence.
  std::vector<std::vector<float>> ref(static_cast<size_t>(b));
  std::vector<parallel::MlaCache> prefill_caches;
  for (int64_t s = 0; s < b; ++s) {
    const parallel::MlaPrefillResult pre = parallel::mla_prefill_tp(
        cfg, w, xs[static_cast<size_t>(s)].view().slice(0, 0, prompts[s]), *tp, cap);
    prefill_caches.push_back(pre.cache);
    parallel::MlaDecoder dec(cfg, w, setup, tp, rpp);
    dec.load_prefill(pre.cache);
    for (int64_t t = 0; t < steps; ++t) {
      std::vector<float> y(static_cast<size_t>(hid));
      dec.step(xs[static_cast<size_t>(s)].data_as<float>() + (prompts[s] + t) * hid, y.data());
      ref[static_cast<size_t>(s)].insert(ref[static_cast<size_t>(s)].end(), y.begin(), y.end());
    }
  }
  // Batched: both sequences' shards in one pool, the step run on a [2, hidden] batch.
  const parallel::MlaRankWeights rw = parallel::make_mla_rank_weights(cfg, w, setup, r, p, rpp);
  std::unique_ptr<comm::Communicator> latent_comm;
  if (sharding == parallel::MlaSharding::kTpla)
    latent_comm = tp->split(r % (p / rw.groups), rw.group);
  const int64_t pages_per_seq = (cap + ps - 1) / ps;
  Tensor pages = Tensor::zeros({b * pages_per_seq, ps, rw.dl + cfg.qk_rope}, DType::kFloat32);
  Tensor table = Tensor::zeros({b, pages_per_seq}, DType::kInt32);
  std::vector<int64_t> local_len(static_cast<size_t>(b));
  for (int64_t s = 0; s < b; ++s) {
    parallel::MlaCache shard =
        sharding == parallel::MlaSharding::kTpla
            ? parallel::reshard_to_tpla(prefill_caches[static_cast<size_t>(s)], rp, rw.group, cap)
        : sharding == parallel::MlaSharding::kDecodeCp
            ? parallel::reshard_to_decode_cp(prefill_caches[static_cast<size_t>(s)], r, p, cap)
            : prefill_caches[static_cast<size_t>(s)];
    std::vector<float> row(static_cast<size_t>(rw.dl + cfg.qk_rope));
    for (int64_t t = 0; t < shard.length(); ++t) {
      shard.read_row(t, row.data());
      float* dst = pages.data_as<float>() +
                   ((s * pages_per_seq + t / ps) * ps + t % ps) * (rw.dl + cfg.qk_rope);
      std::copy(row.begin(), row.end(), dst);
    }
    for (int64_t i = 0; i < pages_per_seq; ++i)
      table.data_as<int32_t>()[s * pages_per_seq + i] = static_cast<int32_t>(s * pages_per_seq + i);
    local_len[static_cast<size_t>(s)] = shard.length();
  }
  for (int64_t t = 0; t < steps; ++t) {
    Tensor x = Tensor::empty({b, hid}, DType::kFloat32);
    std::vector<int64_t> pos(static_cast<size_t>(b)), rows(static_cast<size_t>(b));
    Tensor lens = Tensor::empty({b}, DType::kInt32);
    for (int64_t s = 0; s < b; ++s) {
      std::copy_n(xs[static_cast<size_t>(s)].data_as<float>() + (prompts[s] + t) * hid, hid,
                  x.data_as<float>() + s * hid);
      const int64_t g = prompts[s] + t;  // global position of the new token
      pos[static_cast<size_t>(s)] = g;
      const bool owner = sharding != parallel::MlaSharding::kDecodeCp || (g / ps) % p == r;
      int64_t& ll = local_len[static_cast<size_t>(s)];
      rows[static_cast<size_t>(s)] = owner ? (s * pages_per_seq + ll / ps) * ps + ll % ps : -1;
      if (owner) ++ll;
      lens.data_as<int32_t>()[s] = static_cast<int32_t>(ll);
    }
    Tensor y = Tensor::empty({b, hid}, DType::kFloat32);
    parallel::MlaStepArgs a;
    a.x = x;
    a.positions = pos;
    a.append_rows = rows;
    a.cache = {pages, table, lens, rw.dl};
    a.y = y;
    parallel::mla_decode_step(cfg, rw, setup, rpp, *tp, latent_comm.get(), a);
    for (int64_t s = 0; s < b; ++s) {
      double err = 0, mx = 0;
      for (int64_t j = 0; j < hid; ++j) {
        const double want = ref[static_cast<size_t>(s)][static_cast<size_t>(t * hid + j)];
        err = std::max(err, std::abs(y.data_as<float>()[s * hid + j] - want));
        mx = std::max(mx, std::abs(want));
      }
      EXPECT_LT(err, 1e-5 * std::max(1.0, mx))
          << parallel::sharding_name(sharding) << " sequence " << s << " step " << t;
    }
  }
}

TEST(MlaDecodeStep, BatchedStepEqualsMlaDecoderForMlaTp) {
  batch_matches_decoder(parallel::MlaSharding::kMlaTp, parallel::TplaNorm::kExact);
}
TEST(MlaDecodeStep, BatchedStepEqualsMlaDecoderForDecodeCp) {
  batch_matches_decoder(parallel::MlaSharding::kDecodeCp, parallel::TplaNorm::kExact);
}
TEST(MlaDecodeStep, BatchedStepEqualsMlaDecoderForTplaExactAndSlicedNorm) {
  batch_matches_decoder(parallel::MlaSharding::kTpla, parallel::TplaNorm::kExact);
  batch_matches_decoder(parallel::MlaSharding::kTpla, parallel::TplaNorm::kSliced);
}

}  // namespace
}  // namespace distattn
