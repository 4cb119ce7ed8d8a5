// Serving pieces that need no communication: transfer plans for every prefill x decode
// sharding pair moved byte-exact against a full-tensor reference (every rank simulated in one
// process), the byte formulas, the page pool's accounting, the handshake's wire form and
// comparison, the workload generator and the metrics definitions.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <set>

#include "common/test_data.h"
#include "distattn/ops/elementwise.h"
#include "distattn/serving/handshake.h"
#include "distattn/serving/kv_pool.h"
#include "distattn/serving/metrics.h"
#include "distattn/serving/sharding.h"
#include "distattn/serving/transfer.h"
#include "distattn/serving/workload.h"

namespace distattn::serving {
namespace {

KvGeometry gqa_geometry(DType dt = DType::kFloat32) {
  KvGeometry g;
  g.family = ModelFamily::kGqa;
  g.layers = 2;
  g.heads = 8;
  g.kv_heads = 2;
  g.head_dim = 8;
  g.head_dim_v = 8;
  g.dtype = dt;
  g.page_size = 4;
  return g;
}

KvGeometry mla_geometry(DType dt = DType::kFloat32) {
  KvGeometry g;
  g.family = ModelFamily::kMla;
  g.layers = 2;
  g.heads = 4;
  g.latent = 16;
  g.rope = 4;
  g.dtype = dt;
  g.page_size = 4;
  return g;
}

// Value of the full KV at (layer, token, unit, component j): GQA j < D is K, j >= D is V;
// MLA unit < latent is the latent column, unit >= latent is k_pe column unit - latent.
float full_value(int64_t layer, int64_t token, int64_t unit, int64_t j) {
  return static_cast<float>(testing::test_value(99, static_cast<uint64_t>(layer * 7 + j % 97),
                                                static_cast<uint64_t>(token * 1000 + unit)));
}

// The value the decode side must hold: MLA latent columns of a TPLA side live in the rotated
// space; here the "rotation" is a column permutation (an orthogonal U), applied by the sender
// as the engine does for TPLA, and the expected value is read through it.
struct Rotation {
  std::vector<int64_t> perm;  // c_hat[j] = c[perm[j]]
};

// One prefill rank's layer KV as the model's KvSink hands it over.
void prefill_kv(const KvGeometry& g, const PrefillLayout& p, int rank, int64_t tokens,
                int64_t layer, const Rotation* rot, Tensor& k, Tensor& v) {
  if (g.family == ModelFamily::kMla) {
    k = Tensor::empty({tokens, g.latent + g.rope}, DType::kFloat32);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t c = 0; c < g.latent + g.rope; ++c) {
        const int64_t src = c < g.latent && rot ? rot->perm[static_cast<size_t>(c)] : c;
        k.data_as<float>()[t * (g.latent + g.rope) + c] = full_value(layer, t, src, 0);
      }
    return;
  }
  std::vector<int64_t> pos;
  KvBlock units{0, 0, 0, g.kv_heads, 0};
  if (p.sharding == PrefillSharding::kHeads) {
    units = prefill_holdings(g, p, rank, tokens).front();
    for (int64_t t = 0; t < tokens; ++t) pos.push_back(t);
  } else {
    pos = parallel::token_positions(p.sp_layout(), p.padded_length(tokens), rank);
  }
  const int64_t rows = static_cast<int64_t>(pos.size()), nu = units.units();
  Tensor k32 = Tensor::empty({rows, nu, g.head_dim}, DType::kFloat32);
  Tensor v32 = Tensor::empty({rows, nu, g.head_dim_v}, DType::kFloat32);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t u = 0; u < nu; ++u)
      for (int64_t j = 0; j < g.head_dim; ++j) {
        // Padding rows hold junk that must never arrive anywhere.
        const bool pad = pos[static_cast<size_t>(i)] >= tokens;
        k32.data_as<float>()[(i * nu + u) * g.head_dim + j] =
            pad ? 1e30f : full_value(layer, pos[static_cast<size_t>(i)], units.unit_begin + u, j);
        v32.data_as<float>()[(i * nu + u) * g.head_dim_v + j] =
            pad ? 1e30f
                : full_value(layer, pos[static_cast<size_t>(i)], units.unit_begin + u,
                             g.head_dim + j);
      }
  k = Tensor::empty({rows, nu, g.head_dim}, g.dtype);
  v = Tensor::empty({rows, nu, g.head_dim_v}, g.dtype);
  ops::tensor_copy(k, k32);
  ops::tensor_copy(v, v32);
}

float rounded(float x, DType dt) {
  if (dt == DType::kFloat32) return x;
  float in = x, out = 0;
  Tensor a = Tensor::empty({1}, dt);
  ops::tensor_copy(a, TensorView(&in, DType::kFloat32, Device::cpu(), {1}));
  ops::tensor_copy(TensorView(&out, DType::kFloat32, Device::cpu(), {1}), a);
  return out;
}

// Moves one request through the plan (every message of every layer packed by its src and
// unpacked by its dst) and checks every value every decode rank holds, token by token.
// direct: parts go through source_bytes/dest_bytes (in place where one run) as the engine
// sends them; else through the whole-message pack/unpack. contiguous: the request's pages are
// consecutive (in place receives apply), else scattered out of order.
void check_pair(const KvGeometry& g, const PrefillLayout& p, const DecodeLayout& d, int64_t tokens,
                bool direct = false, bool contiguous = false) {
  SCOPED_TRACE(::testing::Message()
               << family_name(g.family) << " " << prefill_sharding_name(p.sharding)
               << " P=" << p.ranks << " -> " << decode_sharding_name(d.sharding) << " D=" << d.ranks
               << " tokens=" << tokens << " " << dtype_name(g.dtype));
  const TransferPlan plan = make_transfer_plan(g, p, d, tokens);
  Rotation rot;
  const bool tpla = d.sharding == DecodeSharding::kTpla;
  for (int64_t c = 0; c < g.latent; ++c) rot.perm.push_back((c * 5 + 3) % g.latent);
  std::vector<std::unique_ptr<KvPool>> pools;
  std::vector<std::vector<int32_t>> pages;
  for (int j = 0; j < d.ranks; ++j) {
    const int64_t np = decode_pages_needed(g, d, j, tokens);
    pools.push_back(std::make_unique<KvPool>(g, decode_units(g, d, j).units(), np + 2));
    // Scatter the request over non-contiguous pages, as a used pool would.
    std::vector<int32_t> all = *pools.back()->allocate(np + 2);
    std::vector<int32_t> pg;
    if (contiguous) {
      for (int64_t i = 1; i <= np; ++i) pg.push_back(all[static_cast<size_t>(i)]);
    } else {
      // Every other page, from the end (pages out of order, with holes).
      for (int64_t i = np + 1; i >= 0 && static_cast<int64_t>(pg.size()) < np; i -= 2)
        pg.push_back(all[static_cast<size_t>(i)]);
      for (int64_t i = np; i >= 0 && static_cast<int64_t>(pg.size()) < np; i -= 2)
        pg.push_back(all[static_cast<size_t>(i)]);
    }
    std::set<int32_t> keep(pg.begin(), pg.end());
    for (int32_t a : all)
      if (!keep.count(a)) pools.back()->release(std::span<const int32_t>(&a, 1));
    for (int64_t l = 0; l < g.layers; ++l) {
      ops::tensor_fill(pools.back()->k(l), -7.0);
      if (g.family == ModelFamily::kGqa) ops::tensor_fill(pools.back()->v(l), -7.0);
    }
    pages.push_back(pg);
  }
  int64_t messages = 0, in_place = 0;
  for (int64_t l = 0; l < g.layers; ++l)
    for (int i = 0; i < p.ranks; ++i) {
      Tensor k, v;
      prefill_kv(g, p, i, tokens, l, tpla ? &rot : nullptr, k, v);
      for (int j = 0; j < d.ranks; ++j) {
        const std::vector<size_t> segs = plan.message(l, i, j);
        if (segs.empty()) continue;
        ++messages;
        KvPool& pool = *pools[static_cast<size_t>(j)];
        const std::vector<int32_t>& pg = pages[static_cast<size_t>(j)];
        if (!direct) {
          Tensor buf = Tensor::empty({message_bytes(plan, segs)}, DType::kUInt8);
          pack_message(plan, segs, 42, LayerKvView{k, v}, buf);
          ASSERT_TRUE(unpack_message(plan, segs, 42, buf, pool, pg));
          continue;
        }
        for (const MessagePart& part : message_parts(plan, segs)) {
          Tensor stage = Tensor::empty({part.bytes}, DType::kUInt8);
          if (part.kind == MessagePart::Kind::kHeader) {
            write_header(plan, segs, 42, kMessageMagic, stage);
            ASSERT_TRUE(check_header(plan, segs, 42, stage));
            continue;
          }
          TensorView src = source_bytes(plan, part, LayerKvView{k, v});
          if (src.data == nullptr) {
            pack_part(plan, part, LayerKvView{k, v}, stage);
            src = stage;
          }
          const TensorView dst = dest_bytes(plan, part, pool, pg);
          if (dst.data != nullptr) {
            in_place += 1;
            device_copy(dst.data, dst.device, src.data, src.device,
                        static_cast<size_t>(part.bytes));
          } else {
            Tensor landing = Tensor::empty({part.bytes}, DType::kUInt8);
            device_copy(landing.data(), Device::cpu(), src.data, src.device,
                        static_cast<size_t>(part.bytes));
            unpack_part(plan, part, landing, pool, pg);
          }
        }
      }
    }
  EXPECT_GT(messages, 0);
  // With consecutive pages, same-layout pairs land in place (one run of the pool).
  bool whole_units = false;  // a segment carrying every unit its decode rank stores
  for (const TransferSegment& s : plan.segments)
    whole_units = whole_units || s.block.units() == decode_units(g, d, s.dst).units();
  if (direct && contiguous && whole_units) EXPECT_GT(in_place, 0);
  // Every decode rank holds exactly what its holdings say, from the full tensor.
  for (int j = 0; j < d.ranks; ++j) {
    const KvPool& pool = *pools[static_cast<size_t>(j)];
    const KvBlock units = decode_units(g, d, j);
    const int64_t ps = g.page_size;
    int64_t checked = 0;
    for (const KvBlock& blk : decode_holdings(g, d, j, tokens))
      for (int64_t t = blk.token_begin; t < blk.token_end; ++t) {
        const int64_t lt = blk.local_begin + t - blk.token_begin;
        const int32_t page = pages[static_cast<size_t>(j)][static_cast<size_t>(lt / ps)];
        for (int64_t l = 0; l < g.layers; ++l) {
          if (g.family == ModelFamily::kGqa) {
            for (int64_t u = 0; u < units.units(); ++u)
              for (int64_t c = 0; c < g.head_dim; ++c) {
                const double want_k = rounded(full_value(l, t, units.unit_begin + u, c), g.dtype);
                const double want_v =
                    rounded(full_value(l, t, units.unit_begin + u, g.head_dim + c), g.dtype);
                const int64_t off = ((page * ps + lt % ps) * units.units() + u) * g.head_dim + c;
                const auto got = [&](const TensorView& tv) {
                  return testing::to_double_vector(tv.reshape({tv.numel()}).slice(0, off, 1))[0];
                };
                ASSERT_EQ(got(pool.k(l)), want_k) << "K layer " << l << " token " << t << " head "
                                                  << units.unit_begin + u << " rank " << j;
                ASSERT_EQ(got(pool.v(l)), want_v) << "V layer " << l << " token " << t;
              }
          } else {
            const int64_t w = units.units() + g.rope;
            const std::vector<double> row = testing::to_double_vector(
                pool.k(l).reshape({pool.k(l).numel()}).slice(0, (page * ps + lt % ps) * w, w));
            for (int64_t c = 0; c < units.units(); ++c) {
              const int64_t col = units.unit_begin + c;
              const int64_t src = tpla ? rot.perm[static_cast<size_t>(col)] : col;
              ASSERT_EQ(row[static_cast<size_t>(c)], rounded(full_value(l, t, src, 0), g.dtype))
                  << "latent layer " << l << " token " << t << " column " << col;
            }
            for (int64_t c = 0; c < g.rope; ++c)
              ASSERT_EQ(row[static_cast<size_t>(units.units() + c)],
                        rounded(full_value(l, t, g.latent + c, 0), g.dtype))
                  << "k_pe layer " << l << " token " << t;
          }
        }
        ++checked;
      }
    EXPECT_EQ(checked, decode_local_tokens(g, d, j, tokens));
    // Bytes: the plan, the formula and the messages agree.
    EXPECT_EQ(plan.bytes_to(j), expected_bytes_to(g, d, j, tokens));
  }
  int64_t total = 0;
  for (int j = 0; j < d.ranks; ++j) total += expected_bytes_to(g, d, j, tokens);
  EXPECT_EQ(plan.total_bytes(), total);
}

TEST(TransferPlan, EveryGqaShardingPairMovesEveryValueExactly) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16})
    for (int pr : {1, 2, 3, 4})
      for (PrefillSharding ps : {PrefillSharding::kHeads, PrefillSharding::kZigzag,
                                 PrefillSharding::kUlysses, PrefillSharding::kHybrid}) {
        if (ps == PrefillSharding::kHybrid && pr % 2 != 0) continue;
        for (int dr : {1, 2, 3, 4})
          for (DecodeSharding ds : {DecodeSharding::kHeads, DecodeSharding::kDecodeCp})
            for (int64_t tokens : {1, 2 * pr - 1, 13, 17}) {
              if (tokens < 1) continue;
              for (int mode = 0; mode < 3; ++mode) {
                check_pair(gqa_geometry(dt), {ps, pr, ps == PrefillSharding::kHybrid ? 2 : 1},
                           {ds, dr, 0}, tokens, mode > 0, mode == 2);
                if (::testing::Test::HasFatalFailure()) return;
              }
            }
      }
}

TEST(TransferPlan, EveryMlaShardingPairMovesEveryValueExactly) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16})
    for (int pr : {1, 2, 3})
      for (int dr : {1, 2, 4})
        for (DecodeSharding ds :
             {DecodeSharding::kMlaTp, DecodeSharding::kTpla, DecodeSharding::kDecodeCp})
          for (int groups : {0, 2}) {
            if (groups != 0 && (ds != DecodeSharding::kTpla || dr % groups != 0)) continue;
            for (int64_t tokens : {1, 5, 23}) {
              for (int mode = 0; mode < 3; ++mode) {
                check_pair(mla_geometry(dt), {PrefillSharding::kHeads, pr, 1}, {ds, dr, groups},
                           tokens, mode > 0, mode == 2);
                if (::testing::Test::HasFatalFailure()) return;
              }
            }
          }
}

TEST(TransferPlan, TplaTwoGroupsReceive320Of576OfMlaTpBytes) {
  KvGeometry g = mla_geometry(DType::kBFloat16);
  g.latent = 512;
  g.rope = 64;
  g.layers = 1;
  const int64_t tokens = 1000;
  const int64_t tp = expected_bytes_to(g, {DecodeSharding::kMlaTp, 2, 0}, 0, tokens);
  const int64_t tpla = expected_bytes_to(g, {DecodeSharding::kTpla, 2, 2}, 0, tokens);
  EXPECT_EQ(tp, tokens * 1152);   // 576 bf16 values per token
  EXPECT_EQ(tpla, tokens * 640);  // 320 values per token per rank
  EXPECT_EQ(tpla * 576, tp * 320);
  const TransferPlan plan =
      make_transfer_plan(g, {PrefillSharding::kHeads, 2, 1}, {DecodeSharding::kTpla, 2, 2}, tokens);
  EXPECT_EQ(plan.bytes_to(0), tpla);
  EXPECT_EQ(plan.bytes_to(1), tpla);
  // The latent is replicated on the prefill ranks: each sends half of the tokens.
  EXPECT_EQ(plan.bytes_from(0), plan.bytes_from(1));
}

TEST(TransferPlan, ReplicatedKvHeadsAreReadFromDifferentPrefillRanks) {
  KvGeometry g = gqa_geometry();
  g.heads = 8;
  g.kv_heads = 1;  // one KV head, replicated on every prefill and decode rank
  const TransferPlan plan =
      make_transfer_plan(g, {PrefillSharding::kHeads, 2, 1}, {DecodeSharding::kHeads, 2, 0}, 10);
  std::set<int> sources;
  for (const TransferSegment& s : plan.segments) sources.insert(s.src);
  EXPECT_EQ(sources.size(), 2u);
}

TEST(TransferPlan, RejectsImpossiblePairsNamingTheFlag) {
  auto msg = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(msg([] {
              make_transfer_plan(gqa_geometry(), {PrefillSharding::kHeads, 1, 1},
                                 {DecodeSharding::kTpla, 2, 0}, 8);
            }).find("--decode-sharding heads or decode-cp"),
            std::string::npos);
  EXPECT_NE(msg([] {
              make_transfer_plan(mla_geometry(), {PrefillSharding::kZigzag, 2, 1},
                                 {DecodeSharding::kMlaTp, 2, 0}, 8);
            }).find("--prefill-sharding heads"),
            std::string::npos);
  EXPECT_NE(msg([] {
              make_transfer_plan(mla_geometry(), {PrefillSharding::kHeads, 1, 1},
                                 {DecodeSharding::kTpla, 3, 2}, 8);
            }).find("must divide the decode ranks"),
            std::string::npos);
}

TEST(TransferMessage, AMessageFromAnotherRequestOrLayerIsRefused) {
  const KvGeometry g = gqa_geometry();
  const TransferPlan plan =
      make_transfer_plan(g, {PrefillSharding::kHeads, 1, 1}, {DecodeSharding::kHeads, 1, 0}, 6);
  Tensor k, v;
  prefill_kv(g, {PrefillSharding::kHeads, 1, 1}, 0, 6, 0, nullptr, k, v);
  const std::vector<size_t> l0 = plan.message(0, 0, 0), l1 = plan.message(1, 0, 0);
  Tensor buf = Tensor::empty({message_bytes(plan, l0)}, DType::kUInt8);
  pack_message(plan, l0, 7, LayerKvView{k, v}, buf);
  KvPool pool(g, 2, 4);
  const std::vector<int32_t> pages = *pool.allocate(2);
  try {
    unpack_message(plan, l0, 8, buf, pool, pages);
    FAIL() << "a message of request 7 was accepted as request 8";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("KV channel out of order"), std::string::npos);
  }
  EXPECT_THROW(unpack_message(plan, l1, 7, buf, pool, pages), Error);  // layer 0 as layer 1
  Tensor filler = Tensor::empty({message_bytes(plan, l0)}, DType::kUInt8);
  pack_filler(plan, l0, 7, filler);
  EXPECT_FALSE(unpack_message(plan, l0, 7, filler, pool, pages));
}

TEST(KvPool, AllocateIsAllOrNothingAndRefcountsReturnPages) {
  KvPool pool(gqa_geometry(), 2, 8);
  EXPECT_EQ(pool.free_pages(), 8);
  EXPECT_FALSE(pool.allocate(9).has_value());
  EXPECT_EQ(pool.free_pages(), 8);  // nothing taken by a failed allocation
  std::vector<int32_t> a = *pool.allocate(5);
  EXPECT_EQ(pool.used_pages(), 5);
  EXPECT_FALSE(pool.allocate(4).has_value());
  pool.retain(a);  // a second owner (an in-flight transfer)
  pool.release(a);
  EXPECT_EQ(pool.used_pages(), 5);  // still held by the other owner
  pool.release(a);
  EXPECT_EQ(pool.used_pages(), 0);
  EXPECT_EQ(pool.high_water_pages(), 5);
  EXPECT_THROW(pool.release(a), Error);  // double free is a bug, never silent
  std::vector<int32_t> b = *pool.allocate(1);
  const int32_t twice[] = {b[0], b[0]};
  EXPECT_THROW(pool.release(twice), Error);  // listed twice with one reference
  EXPECT_EQ(pool.used_pages(), 0);
  EXPECT_THROW(KvPool(gqa_geometry(), 2, 0), Error);
}

TEST(Handshake, WireRoundTripAndEveryFieldMismatchIsNamedWithBothValues) {
  Handshake h;
  h.geometry = gqa_geometry();
  h.hidden = 256;
  h.vocab = 512;
  h.weights_seed = 3;
  h.prefill = {PrefillSharding::kZigzag, 2, 1};
  h.decode = {DecodeSharding::kHeads, 2, 0};
  const Handshake back = Handshake::parse(h.serialize());
  EXPECT_TRUE(compare_handshakes(h, back).empty());
  auto changed = [&](auto&& edit, const char* field, const char* a, const char* b) {
    Handshake d = h;
    edit(d);
    const auto mm = compare_handshakes(h, Handshake::parse(d.serialize()));
    ASSERT_EQ(mm.size(), 1u) << field;
    EXPECT_EQ(mm[0].field, field);
    EXPECT_EQ(mm[0].prefill_value, a);
    EXPECT_EQ(mm[0].decode_value, b);
    const std::string text = describe_mismatches(mm);
    EXPECT_NE(text.find(field), std::string::npos);
    EXPECT_NE(text.find("no KV was sent"), std::string::npos);
  };
  changed([](Handshake& d) { d.protocol = 2; }, "protocol_version", "1", "2");
  changed([](Handshake& d) { d.geometry.page_size = 8; }, "page_size", "4", "8");
  changed([](Handshake& d) { d.geometry.dtype = DType::kBFloat16; }, "dtype", "fp32", "bf16");
  changed([](Handshake& d) { d.geometry.layers = 3; }, "layers", "2", "3");
  changed([](Handshake& d) { d.geometry.heads = 16; }, "heads", "8", "16");
  changed([](Handshake& d) { d.geometry.kv_heads = 4; }, "kv_heads", "2", "4");
  changed([](Handshake& d) { d.geometry.head_dim = 16; }, "head_dim", "8", "16");
  changed([](Handshake& d) { d.hidden = 128; }, "hidden", "256", "128");
  changed([](Handshake& d) { d.vocab = 1000; }, "vocab", "512", "1000");
  changed([](Handshake& d) { d.weights_seed = 4; }, "weights_seed", "3", "4");
  changed([](Handshake& d) { d.prefill.ranks = 3; }, "prefill_ranks", "2", "3");
  changed([](Handshake& d) { d.prefill.sharding = PrefillSharding::kUlysses; }, "prefill_sharding",
          "zigzag", "ulysses");
  changed([](Handshake& d) { d.decode.ranks = 4; }, "decode_ranks", "2", "4");
  changed([](Handshake& d) { d.decode.sharding = DecodeSharding::kDecodeCp; }, "decode_sharding",
          "heads", "decode-cp");
  // TPLA: rotation id and mu.
  Handshake t = h;
  t.geometry = mla_geometry();
  t.decode = {DecodeSharding::kTpla, 2, 0};
  t.rotation = 1;
  t.rotation_id = 0xABCD;
  t.mu = {1.0f, 0.9f};
  Handshake t2 = Handshake::parse(t.serialize());
  EXPECT_TRUE(compare_handshakes(t, t2).empty());
  t2.rotation_id = 0xABCE;
  t2.mu = {1.0f, 0.8f};
  const auto mm = compare_handshakes(t, t2);
  ASSERT_EQ(mm.size(), 2u);
  EXPECT_EQ(mm[0].field, "tpla_rotation_id");
  EXPECT_EQ(mm[1].field, "tpla_mu");
}

TEST(Handshake, ParseRejectsShortForeignAndOutOfRangeBuffers) {
  Handshake h;
  std::vector<uint8_t> w = h.serialize();
  EXPECT_THROW(Handshake::parse(std::span<const uint8_t>(w.data(), w.size() - 1)), Error);
  std::vector<uint8_t> bad = w;
  bad[0] ^= 0xFF;  // magic
  EXPECT_THROW(Handshake::parse(bad), Error);
  bad = w;
  bad[16] = 9;  // family
  EXPECT_THROW(Handshake::parse(bad), Error);
}

TEST(Workload, PoissonArrivalsAndUniformLengthsAreSeededAndBounded) {
  WorkloadSpec s;
  s.requests = 2000;
  s.rate = 50;
  s.input_len = 100;
  s.output_len = 10;
  s.range_ratio = 0.5;
  s.seed = 5;
  const std::vector<Request> a = make_workload(s), b = make_workload(s);
  ASSERT_EQ(a.size(), 2000u);
  double gaps = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].arrival_s, b[i].arrival_s);
    EXPECT_GE(a[i].input_len, 50);
    EXPECT_LE(a[i].input_len, 150);
    EXPECT_GE(a[i].output_len, 5);
    EXPECT_LE(a[i].output_len, 15);
    if (i > 0) EXPECT_GE(a[i].arrival_s, a[i - 1].arrival_s);
  }
  gaps = a.back().arrival_s / static_cast<double>(a.size());
  EXPECT_NEAR(gaps, 1.0 / 50, 0.1 / 50);  // mean gap 1/rate within 10% over 2000 requests
  s.rate = std::numeric_limits<double>::infinity();
  for (const Request& r : make_workload(s)) EXPECT_EQ(r.arrival_s, 0.0);
  EXPECT_EQ(parse_rate("inf"), std::numeric_limits<double>::infinity());
  EXPECT_THROW(parse_rate("-1"), Error);
  EXPECT_THROW(parse_rate("3x"), Error);
  const std::vector<int32_t> p1 = prompt_tokens(5, 3, 40, 100), p2 = prompt_tokens(5, 3, 40, 100);
  EXPECT_EQ(p1, p2);
  for (int32_t t : p1) EXPECT_TRUE(t >= 0 && t < 100);
}

TEST(Workload, TraceLinesAreParsedOrRejectedWithTheLineNumber) {
  const Request r =
      parse_trace_line(R"({"arrival_s": 1.5, "input_len": 128, "output_len": 16})", 3);
  EXPECT_EQ(r.arrival_s, 1.5);
  EXPECT_EQ(r.input_len, 128);
  EXPECT_EQ(r.output_len, 16);
  for (const char* bad :
       {"", "[1,2]", R"({"arrival_s": 1})", R"({"arrival_s": -1, "input_len": 1, "output_len": 1})",
        R"({"arrival_s": 0, "input_len": 1.5, "output_len": 1})",
        R"({"arrival_s": 0, "input_len": 0, "output_len": 1})"}) {
    try {
      parse_trace_line(bad, 7);
      FAIL() << "accepted: " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("trace line 7"), std::string::npos);
    }
  }
  const std::string path = ::testing::TempDir() + "/trace.jsonl";
  {
    std::ofstream f(path);
    f << R"({"arrival_s": 2, "input_len": 8, "output_len": 2})"
      << "\n\n"
      << R"({"arrival_s": 1, "input_len": 9, "output_len": 3})"
      << "\n";
  }
  const std::vector<Request> t = load_trace(path);
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[0].arrival_s, 1.0);  // sorted by arrival
  EXPECT_EQ(t[0].id, 1);           // ids in file order
}

TEST(Metrics, DefinitionsFollowVllmBenchServe) {
  RequestRecord a;
  a.arrival_s = 1.0;
  a.completed = true;
  a.token_times = {1.5, 1.6, 1.8, 2.1};  // TTFT 500 ms; TPOT (1100-500)/3 = 200 ms
  RequestRecord b;
  b.arrival_s = 2.0;
  b.completed = true;
  b.token_times = {2.1};  // one token: no TPOT
  RequestRecord c;
  c.arrival_s = 0.5;
  c.completed = false;
  c.reason = "refused";
  RunMetrics m;
  compute_metrics({a, b, c}, parse_goodput("ttft:400 tpot:1000"), m);
  EXPECT_EQ(m.completed, 2);
  EXPECT_EQ(m.failed, 1);
  EXPECT_NEAR(m.ttft_ms.mean, 300, 1e-9);
  EXPECT_NEAR(m.tpot_ms.mean, 200, 1e-9);
  EXPECT_EQ(m.itl_ms.count, 3);
  EXPECT_NEAR(m.itl_ms.p50, 200, 1e-9);  // gaps 100, 200, 300
  EXPECT_NEAR(m.e2e_ms.mean, (1100 + 100) / 2.0, 1e-9);
  EXPECT_NEAR(m.duration_s, 2.1 - 0.5, 1e-12);
  EXPECT_NEAR(m.goodput_rps, 1 / 1.6, 1e-9);                     // only b meets TTFT <= 400 ms
  EXPECT_NEAR(percentile_sorted({1, 2, 3, 4}, 90), 3.7, 1e-12);  // numpy's linear rule
  EXPECT_THROW(parse_goodput("ttft=3"), Error);
  EXPECT_THROW(parse_goodput("latency:3"), Error);
  const std::string j = metrics_json(m);
  for (const char* key : {"\"mode\"",
                          "\"model\"",
                          "\"prefill_ranks\"",
                          "\"decode_ranks\"",
                          "\"prefill_sharding\"",
                          "\"decode_sharding\"",
                          "\"requests\"",
                          "\"completed\"",
                          "\"failed\"",
                          "\"throughput_rps\"",
                          "\"output_tok_s\"",
                          "\"ttft_ms\"",
                          "\"tpot_ms\"",
                          "\"itl_ms\"",
                          "\"e2e_ms\"",
                          "\"p99\"",
                          "\"goodput_rps\"",
                          "\"kv_transfer_bytes\"",
                          "\"kv_transfer_gbps\"",
                          "\"kv_pages_leaked\""})
    EXPECT_NE(j.find(key), std::string::npos) << key;
  EXPECT_NE(request_jsonl(c).find("\"status\": \"failed\", \"reason\": \"refused\""),
            std::string::npos);
}

}  // namespace
}  // namespace distattn::serving
