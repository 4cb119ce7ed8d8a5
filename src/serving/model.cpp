// The serving layer's synthetic transformer (distattn/serving/model.h): weights, prefill under
// every prefill sharding, the batched decode step under every decode sharding, the single-rank
// reference, and TPLA's reparameterization.
#include "distattn/serving/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "distattn/core/random.h"
#include "distattn/ops/attention.h"
#include "distattn/ops/dense.h"
#include "distattn/ops/elementwise.h"
#include "distattn/parallel/decode_cp.h"

namespace distattn::serving {

namespace {

// Weight streams of the hash generator (distattn/core/random.h).
enum : uint64_t {
  kEmbed = 101,
  kLmHead,
  kFinalNorm,
  kAttnNorm = 1,
  kMlpNorm,
  kWq,
  kWk,
  kWv,
  kWo,
  kWgate,
  kWup,
  kWdown,
  kCalibTokens = 0x5EED,
};

double bound(int64_t fan_in) {
  return std::sqrt(3.0 / static_cast<double>(fan_in));
}

Tensor norm_weight(uint64_t seed, uint64_t id, int64_t n) {
  Tensor t = Tensor::empty({n}, DType::kFloat32);
  for (int64_t i = 0; i < n; ++i)
    t.data_as<float>()[i] =
        static_cast<float>(1.0 + 0.1 * hash_uniform(seed, id, static_cast<uint64_t>(i)));
  return t;
}

// Columns [dst_col, dst_col + src.cols) of dst <- src (both packed fp32 host matrices).
void put_cols(const Tensor& dst, int64_t dst_col, const Tensor& src) {
  const int64_t rows = src.view().size(0), cols = src.view().size(1);
  const int64_t ld = dst.view().size(1);
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(dst.data_as<float>() + i * ld + dst_col, src.data_as<float>() + i * cols,
                static_cast<size_t>(cols) * sizeof(float));
}

TensorView cols_view(const Tensor& t, int64_t col0, int64_t cols) {
  const int64_t rows = t.view().size(0), ld = t.view().size(1);
  const int64_t shape[] = {rows, cols}, strides[] = {ld, 1};
  return TensorView(t.data_as<float>() + col0, DType::kFloat32, t.device(), shape, strides);
}

// [rows, heads, dim] view of columns [col0, col0 + heads * dim) of a [rows, ld] matrix.
TensorView heads_view(const Tensor& t, int64_t col0, int64_t heads, int64_t dim) {
  const int64_t rows = t.view().size(0), ld = t.view().size(1);
  const int64_t shape[] = {rows, heads, dim}, strides[] = {ld, dim, 1};
  return TensorView(t.data_as<float>() + col0, DType::kFloat32, t.device(), shape, strides);
}

parallel::HeadRange all(int64_t n) {
  return {0, n};
}

// x += attn w_o: attn [M, proj_heads * head_dim_v] fp32, all-reduced over `group` when the
// slice holds only some heads.
void add_projection(const LayerWeights& lw, const RankSlice& slice, const Tensor& x,
                    const TensorView& attn, comm::Communicator* group) {
  const int64_t m = x.view().size(0), hid = x.view().size(1);
  if (m == 0) return;
  Tensor o = Tensor::empty({m, hid}, DType::kFloat32, x.device());
  if (attn.size(1) > 0)
    ops::matmul(attn, lw.w_o, o);
  else
    ops::tensor_zero(o);
  if (slice.reduce) group->all_reduce(o, o, comm::ReduceOp::kSum);
  ops::tensor_add(x, o);
}

// x += MLP(RMSNorm(x)): SiLU(x w_gate) * (x w_up) w_down over the slice's MLP columns,
// all-reduced over `group` when the slice holds only some.
void add_mlp(const LayerWeights& lw, const RankSlice& slice, const Tensor& x,
             comm::Communicator* group, float eps) {
  const int64_t m = x.view().size(0), hid = x.view().size(1);
  if (m == 0) return;
  Tensor h = Tensor::empty({m, hid}, DType::kFloat32, x.device());
  ops::rms_norm(x, lw.mlp_norm, h, eps);
  const int64_t fn = slice.ffn.size();
  Tensor o = Tensor::empty({m, hid}, DType::kFloat32, x.device());
  if (fn > 0) {
    Tensor gu = Tensor::empty({m, 2 * fn}, DType::kFloat32, x.device());
    ops::matmul(h, lw.w_gate_up, gu);
    ops::silu_mul(cols_view(gu, 0, fn), cols_view(gu, fn, fn), cols_view(gu, 0, fn));
    ops::matmul(cols_view(gu, 0, fn), lw.w_down, o);
  } else {
    ops::tensor_zero(o);
  }
  if (slice.reduce) group->all_reduce(o, o, comm::ReduceOp::kSum);
  ops::tensor_add(x, o);
}

// Final norm, LM head and greedy argmax of rows [row0, row0 + n) of x.
void final_rows(const ModelWeights& w, const Tensor& x, int64_t row0, int64_t n, int32_t* tokens,
                float* hidden) {
  const int64_t hid = w.config.hidden;
  Tensor h = Tensor::empty({n, hid}, DType::kFloat32, x.device());
  ops::rms_norm(x.view().slice(0, row0, n), w.final_norm, h, w.config.rms_eps);
  if (tokens != nullptr) {
    Tensor logits = Tensor::empty({n, w.config.vocab}, DType::kFloat32, x.device());
    ops::matmul(h, w.lm_head, logits);
    ops::argmax_rows(logits, std::span<int32_t>(tokens, static_cast<size_t>(n)));
  }
  if (hidden != nullptr) {
    const int64_t shape[] = {n, hid};
    ops::tensor_copy(TensorView(hidden, DType::kFloat32, Device::cpu(), shape), h);
  }
}

}  // namespace

// ---- config ------------------------------------------------------------------------------

ModelConfig ModelConfig::defaults(ModelFamily family) {
  ModelConfig c;
  c.family = family;
  if (family == ModelFamily::kMla) {
    c.heads = 8;
    c.kv_heads = 1;
    c.head_dim = 0;
  }
  return c;
}

void ModelConfig::validate() const {
  DISTATTN_CHECK(hidden >= 2 && layers >= 1 && ffn >= 1 && vocab >= 2 && heads >= 1,
                 "model: --hidden >= 2, --layers >= 1, --ffn >= 1, --vocab >= 2 and --heads >= 1 "
                 "are required; got ",
                 str());
  DISTATTN_CHECK(vocab < (int64_t{1} << 24), "model: --vocab must be below 2^24; got ", vocab);
  DISTATTN_CHECK(dtype == DType::kFloat32 || dtype == DType::kBFloat16,
                 "model: --dtype must be fp32 or bf16; got ", dtype_name(dtype));
  DISTATTN_CHECK(rms_eps > 0 && rope_theta > 0, "model: rms_eps and rope_theta must be > 0");
  if (family == ModelFamily::kGqa) {
    DISTATTN_CHECK(kv_heads >= 1 && heads % kv_heads == 0, "model: --heads (", heads,
                   ") must be a multiple of --kv-heads (", kv_heads, ")");
    DISTATTN_CHECK(head_dim >= 2 && head_dim % 2 == 0,
                   "model: --head-dim must be even (RoPE rotates pairs); got ", head_dim);
  } else {
    mla(16).validate();
  }
}

parallel::MlaConfig ModelConfig::mla(int64_t page_size) const {
  parallel::MlaConfig m;
  m.hidden = hidden;
  m.heads = heads;
  m.q_lora_rank = mla_q_lora;
  m.kv_lora_rank = mla_latent;
  m.qk_nope = mla_nope;
  m.qk_rope = mla_rope;
  m.v_head = mla_v;
  m.rope_theta = rope_theta;
  m.rms_eps = rms_eps;
  m.page_size = page_size;
  return m;
}

KvGeometry ModelConfig::geometry(int64_t page_size) const {
  KvGeometry g;
  g.family = family;
  g.layers = layers;
  g.heads = heads;
  g.kv_heads = family == ModelFamily::kGqa ? kv_heads : 1;
  g.head_dim = head_dim;
  g.head_dim_v = head_dim;
  g.latent = mla_latent;
  g.rope = mla_rope;
  g.dtype = dtype;
  g.page_size = page_size;
  return g;
}

std::string ModelConfig::str() const {
  std::ostringstream os;
  os << family_name(family) << " hidden=" << hidden << " heads=" << heads;
  if (family == ModelFamily::kGqa)
    os << " kv-heads=" << kv_heads << " head-dim=" << head_dim;
  else
    os << " latent=" << mla_latent << " rope=" << mla_rope << " nope=" << mla_nope << " v=" << mla_v
       << " q-lora=" << mla_q_lora;
  os << " layers=" << layers << " ffn=" << ffn << " vocab=" << vocab
     << " dtype=" << dtype_name(dtype) << " seed=" << seed;
  return os.str();
}

// ---- slices and weights -------------------------------------------------------------------

RankSlice RankSlice::full(const ModelConfig& cfg) {
  RankSlice s;
  s.attn_heads = s.proj_heads = all(cfg.heads);
  s.kv_heads = all(cfg.family == ModelFamily::kGqa ? cfg.kv_heads : 1);
  s.ffn = all(cfg.ffn);
  return s;
}

RankSlice RankSlice::head_parallel(const ModelConfig& cfg, int rank, int ranks) {
  RankSlice s;
  parallel::SpLayout l{parallel::Strategy::kHeads, ranks, 1};
  parallel::SpShape sh;
  sh.heads_q = cfg.heads;
  sh.heads_kv = cfg.family == ModelFamily::kGqa ? cfg.kv_heads : 1;
  s.attn_heads = s.proj_heads = parallel::local_query_heads(l, sh, rank);
  s.kv_heads = cfg.family == ModelFamily::kGqa ? parallel::local_kv_heads(l, sh, rank) : all(1);
  s.ffn = parallel::split_heads(cfg.ffn, ranks, rank);
  s.reduce = ranks > 1;
  return s;
}

RankSlice RankSlice::cache_parallel(const ModelConfig& cfg, int rank, int ranks) {
  RankSlice s = full(cfg);
  s.proj_heads = parallel::split_heads(cfg.heads, ranks, rank);
  s.ffn = parallel::split_heads(cfg.ffn, ranks, rank);
  s.reduce = ranks > 1;
  return s;
}

RankSlice RankSlice::tpla(const ModelConfig& cfg, int rank, int ranks, int groups) {
  RankSlice s = full(cfg);
  const int hparts = ranks / groups;
  s.attn_heads = s.proj_heads = parallel::split_heads(cfg.heads, hparts, rank % hparts);
  s.ffn = parallel::split_heads(cfg.ffn, ranks, rank);
  s.reduce = ranks > 1;
  return s;
}

uint64_t ModelWeights::layer_seed(const ModelConfig& cfg, int64_t layer) {
  // A distinct, well-mixed seed per layer (hash of the model seed and the layer index).
  const double u = hash_uniform(cfg.seed, 0x1A7E4ull, static_cast<uint64_t>(layer));
  return static_cast<uint64_t>((u + 1.0) * 4503599627370496.0) ^ (cfg.seed * 0x9E37ull);
}

ModelWeights ModelWeights::generate(const ModelConfig& cfg, const RankSlice& slice, Device device) {
  cfg.validate();
  DISTATTN_CHECK_STATUS(device.is_cpu() || cfg.family == ModelFamily::kGqa, Status::kUnsupported,
                        "--model mla runs on CPU ranks (its prefill, parallel::mla_prefill_tp, "
                        "is host-only): use --device cpu");
  ModelWeights w;
  w.config = cfg;
  w.slice = slice;
  const int64_t hid = cfg.hidden;
  w.embed = uniform_matrix_block(cfg.seed, kEmbed, cfg.vocab, hid, hid, 0, 0, 1.0);
  w.final_norm = norm_weight(cfg.seed, kFinalNorm, hid);
  w.lm_head = uniform_matrix_block(cfg.seed, kLmHead, hid, cfg.vocab, cfg.vocab, 0, 0, bound(hid));
  const int64_t f0 = slice.ffn.begin, fn = slice.ffn.size();
  for (int64_t l = 0; l < cfg.layers; ++l) {
    const uint64_t s = layer_seed(cfg, l);
    LayerWeights lw;
    lw.attn_norm = norm_weight(s, kAttnNorm, hid);
    lw.mlp_norm = norm_weight(s, kMlpNorm, hid);
    if (cfg.family == ModelFamily::kGqa) {
      const int64_t d = cfg.head_dim, hq = cfg.heads, hkv = cfg.kv_heads;
      const int64_t qa = slice.attn_heads.size(), ka = slice.kv_heads.size();
      lw.w_qkv = Tensor::empty({hid, (qa + 2 * ka) * d}, DType::kFloat32);
      put_cols(lw.w_qkv, 0,
               uniform_matrix_block(s, kWq, hid, qa * d, hq * d, 0, slice.attn_heads.begin * d,
                                    bound(hid)));
      put_cols(lw.w_qkv, qa * d,
               uniform_matrix_block(s, kWk, hid, ka * d, hkv * d, 0, slice.kv_heads.begin * d,
                                    bound(hid)));
      put_cols(lw.w_qkv, (qa + ka) * d,
               uniform_matrix_block(s, kWv, hid, ka * d, hkv * d, 0, slice.kv_heads.begin * d,
                                    bound(hid)));
      lw.w_o = uniform_matrix_block(s, kWo, slice.proj_heads.size() * d, hid, hid,
                                    slice.proj_heads.begin * d, 0, bound(hq * d));
    } else {
      lw.mla = parallel::MlaWeights::generate(cfg.mla(16), s, slice.attn_heads.begin,
                                              slice.attn_heads.size());
    }
    lw.w_gate_up = Tensor::empty({hid, 2 * fn}, DType::kFloat32);
    put_cols(lw.w_gate_up, 0, uniform_matrix_block(s, kWgate, hid, fn, cfg.ffn, 0, f0, bound(hid)));
    put_cols(lw.w_gate_up, fn, uniform_matrix_block(s, kWup, hid, fn, cfg.ffn, 0, f0, bound(hid)));
    lw.w_down = uniform_matrix_block(s, kWdown, fn, hid, hid, f0, 0, bound(cfg.ffn));
    w.layers.push_back(std::move(lw));
  }
  if (device.is_cuda()) {
    auto move = [&](Tensor& t) {
      if (t.defined()) t = to_device(t, device);
    };
    move(w.embed);
    move(w.final_norm);
    move(w.lm_head);
    for (LayerWeights& lw : w.layers)
      for (Tensor* t : {&lw.attn_norm, &lw.mlp_norm, &lw.w_qkv, &lw.w_o, &lw.w_gate_up, &lw.w_down})
        move(*t);
  }
  return w;
}

// ---- prefill --------------------------------------------------------------------------------

namespace {

void validate_prefill(const ModelConfig& cfg, const PrefillLayout& layout) {
  cfg.validate();
  if (cfg.family == ModelFamily::kMla) {
    DISTATTN_CHECK(layout.sharding == PrefillSharding::kHeads,
                   "MLA prefill is exact MLA with heads split: use --prefill-sharding heads");
    DISTATTN_CHECK(cfg.heads % layout.ranks == 0, "MLA prefill splits the ", cfg.heads,
                   " heads over ", layout.ranks,
                   " prefill ranks: use a prefill rank count dividing --heads");
    return;
  }
  if (layout.sharding == PrefillSharding::kHeads) return;
  if (layout.sharding == PrefillSharding::kHybrid)
    DISTATTN_CHECK(layout.ulysses >= 1 && layout.ranks % layout.ulysses == 0,
                   "hybrid prefill: --prefill-ulysses (", layout.ulysses,
                   ") must divide the prefill ranks (", layout.ranks, ")");
  const int u = layout.sharding == PrefillSharding::kUlysses  ? layout.ranks
                : layout.sharding == PrefillSharding::kHybrid ? layout.ulysses
                                                              : 1;
  DISTATTN_CHECK(cfg.heads >= u, prefill_sharding_name(layout.sharding), " prefill over ", u,
                 " Ulysses ranks needs at least ", u, " query heads; got --heads ", cfg.heads);
}

// Status all-reduce of one layer (fault containment, model.h PrefillHooks): 0 when every rank
// passed, else throws RequestFailure on every rank with the failing rank's message.
void layer_status(comm::Communicator& host, int64_t layer, const std::string& local_error) {
  int32_t code = local_error.empty() ? 0 : host.rank() + 1;
  host.all_reduce(&code, &code, 1, DType::kInt32, comm::ReduceOp::kMax);
  if (code == 0) return;
  constexpr size_t kLen = 240;
  char msg[kLen] = {};
  if (host.rank() == code - 1) std::strncpy(msg, local_error.c_str(), kLen - 1);
  host.broadcast(msg, msg, kLen, DType::kUInt8, code - 1);
  msg[kLen - 1] = 0;
  throw RequestFailure(
      detail::concat("prefill rank ", code - 1, " failed in layer ", layer, ": ", msg));
}

}  // namespace

PrefillModel::PrefillModel(const ModelConfig& cfg, const PrefillLayout& layout,
                           std::shared_ptr<comm::Communicator> group,
                           std::shared_ptr<comm::Communicator> host, Device device)
    : cfg_(cfg),
      layout_(layout),
      device_(device),
      group_(std::move(group)),
      host_(std::move(host)) {
  DISTATTN_CHECK(group_ != nullptr, "PrefillModel: a group communicator is required");
  if (!host_) host_ = group_;
  DISTATTN_CHECK(group_->size() == layout.ranks, "PrefillModel: the layout has ", layout.ranks,
                 " ranks but the group has ", group_->size());
  validate_prefill(cfg, layout);
  const int r = group_->rank(), p = group_->size();
  const bool heads = layout.sharding == PrefillSharding::kHeads;
  weights_ = ModelWeights::generate(
      cfg, heads ? RankSlice::head_parallel(cfg, r, p) : RankSlice::full(cfg));
  if (layout.sharding == PrefillSharding::kHybrid) {
    mesh_ = std::make_unique<comm::DeviceMesh>(
        group_, comm::DeviceMesh::Axes{{"ring", p / layout.ulysses}, {"ulysses", layout.ulysses}});
    sp_ = parallel::SpGroup::from_mesh(*mesh_);
  } else {
    sp_ = parallel::SpGroup::flat(*group_);
  }
  // Layout rank == group rank for both (the mesh is row-major over the group): token
  // positions and the owner of the last token below are computed with the group rank.
  DISTATTN_CHECK_STATUS(sp_.layout_rank(layout.sp_layout().strategy) == r, Status::kInternal,
                        "PrefillModel: layout rank differs from the group rank");
}

PrefillModel::~PrefillModel() = default;

PrefillOutput PrefillModel::run(std::span<const int32_t> tokens, const KvSink& sink,
                                const PrefillHooks& hooks, bool all_hidden) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  DISTATTN_CHECK(n >= 1, "prefill: a prompt needs at least one token");
  for (int32_t t : tokens)
    DISTATTN_CHECK(t >= 0 && t < cfg_.vocab, "prefill: token ", t, " is outside the vocab [0, ",
                   cfg_.vocab, ")");
  DISTATTN_CHECK(!all_hidden || group_->size() == 1,
                 "prefill: all_hidden is for the single-rank reference");
  const int rank = group_->rank();
  const RankSlice& sl = weights_.slice;
  const int64_t hid = cfg_.hidden;
  const bool seq_sharded = layout_.sharding != PrefillSharding::kHeads;
  const int64_t padded = layout_.padded_length(n);
  std::vector<int64_t> pos;
  if (seq_sharded) {
    pos = parallel::token_positions(layout_.sp_layout(), padded, rank);
  } else {
    pos.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pos[static_cast<size_t>(i)] = i;
  }
  const int64_t rows = static_cast<int64_t>(pos.size());
  std::vector<int32_t> ids(pos.size());
  for (size_t i = 0; i < pos.size(); ++i)
    ids[i] = pos[i] < n ? tokens[static_cast<size_t>(pos[i])] : 0;

  const Device dev = device_;
  Tensor x = Tensor::empty({rows, hid}, DType::kFloat32, dev);
  ops::embedding(weights_.embed, ids, x);
  Tensor h = Tensor::empty({rows, hid}, DType::kFloat32, dev);
  auto progress = [&] {
    if (hooks.progress) hooks.progress();
  };
  for (int64_t l = 0; l < cfg_.layers; ++l) {
    const LayerWeights& lw = weights_.layers[static_cast<size_t>(l)];
    std::string local_error;
    if (hooks.before_layer) {
      try {
        hooks.before_layer(l);
      } catch (const std::exception& e) {
        local_error = e.what();
      }
    }
    layer_status(*host_, l, local_error);
    ops::rms_norm(x, lw.attn_norm, h, cfg_.rms_eps);
    if (hooks.on_layer_input) hooks.on_layer_input(l, h);
    if (cfg_.family == ModelFamily::kMla) {
      // Exact MLA with heads split; the whole latent cache is on every rank (fp32 rows).
      const parallel::MlaConfig mc = cfg_.mla(16);
      parallel::MlaPrefillResult r = parallel::mla_prefill_tp(mc, lw.mla, h, *group_, n);
      const TensorView pages = r.cache.pages().view();
      const TensorView cache_rows =
          pages.reshape({pages.size(0) * pages.size(1), pages.size(2)}).slice(0, 0, n);
      if (sink) sink(l, LayerKv{{cache_rows, TensorView{}}, r.cache.pages(), Tensor()});
      progress();
      // y is the all-reduced attention output.
      ops::tensor_add(x, r.y);
      add_mlp(lw, sl, x, group_.get(), cfg_.rms_eps);
      progress();
      continue;
    }
    const int64_t d = cfg_.head_dim, qa = sl.attn_heads.size(), ka = sl.kv_heads.size();
    Tensor qkv = Tensor::empty({rows, (qa + 2 * ka) * d}, DType::kFloat32, dev);
    ops::matmul(h, lw.w_qkv, qkv);
    const TensorView q32 = heads_view(qkv, 0, qa, d), k32 = heads_view(qkv, qa * d, ka, d);
    const TensorView v32 = heads_view(qkv, (qa + ka) * d, ka, d);
    ops::rope(q32, pos, cfg_.rope_theta);
    ops::rope(k32, pos, cfg_.rope_theta);
    Tensor q = Tensor::empty({1, rows, qa, d}, cfg_.dtype, dev);
    Tensor k = Tensor::empty({1, rows, ka, d}, cfg_.dtype, dev);
    Tensor v = Tensor::empty({1, rows, ka, d}, cfg_.dtype, dev);
    ops::tensor_copy(q.view().reshape({rows, qa, d}), q32);
    ops::tensor_copy(k.view().reshape({rows, ka, d}), k32);
    ops::tensor_copy(v.view().reshape({rows, ka, d}), v32);
    if (sink)
      sink(l, LayerKv{{k.view().reshape({rows, ka, d}), v.view().reshape({rows, ka, d})}, k, v});
    progress();
    Tensor out = Tensor::empty({1, rows, qa, d}, DType::kFloat32, dev);
    Tensor lse = Tensor::empty({1, qa, rows}, DType::kFloat32, dev);
    parallel::SpOptions so;
    so.causal = true;
    so.heads_q = cfg_.heads;
    so.heads_kv = cfg_.kv_heads;
    parallel::sp_attention_forward(layout_.sp_layout().strategy, sp_, q, k, v, out, lse, so);
    progress();
    add_projection(lw, sl, x, out.view().reshape({rows, qa * d}), group_.get());
    add_mlp(lw, sl, x, group_.get(), cfg_.rms_eps);
    progress();
  }

  PrefillOutput res;
  res.last_hidden.resize(static_cast<size_t>(hid));
  if (all_hidden) {
    res.all_hidden.resize(static_cast<size_t>(n * hid));
    final_rows(weights_, x, 0, n, nullptr, res.all_hidden.data());
  }
  // The rank holding the last prompt token computes the first token and shares it.
  int owner = 0;
  int64_t row = n - 1;
  if (seq_sharded) {
    const parallel::SpLayout spl = layout_.sp_layout();
    for (int r = 0; r < layout_.ranks; ++r) {
      const std::vector<int64_t> pr = parallel::token_positions(spl, padded, r);
      const auto it = std::find(pr.begin(), pr.end(), n - 1);
      if (it != pr.end()) {
        owner = r;
        row = it - pr.begin();
        break;
      }
    }
  }
  std::vector<float> buf(static_cast<size_t>(hid + 1), 0.0f);
  if (rank == owner) {
    int32_t tok = 0;
    final_rows(weights_, x, row, 1, &tok, buf.data());
    buf[static_cast<size_t>(hid)] = static_cast<float>(tok);
  }
  if (layout_.ranks > 1)
    host_->broadcast(buf.data(), buf.data(), buf.size(), DType::kFloat32, owner);
  std::copy(buf.begin(), buf.begin() + hid, res.last_hidden.begin());
  res.first_token = static_cast<int32_t>(buf[static_cast<size_t>(hid)]);
  return res;
}

// ---- TPLA reparameterization ------------------------------------------------------------

std::vector<parallel::TplaReparam> make_tpla_reparams(const ModelConfig& cfg,
                                                      const DecodeSetup& setup,
                                                      std::shared_ptr<comm::Communicator> self) {
  DISTATTN_CHECK(cfg.family == ModelFamily::kMla && setup.layout.sharding == DecodeSharding::kTpla,
                 "make_tpla_reparams: for --model mla with --decode-sharding tpla");
  DISTATTN_CHECK(self != nullptr && self->size() == 1,
                 "make_tpla_reparams: pass a one-rank communicator");
  DISTATTN_CHECK(setup.calib_tokens >= 1, "make_tpla_reparams: calibration needs >= 1 token");
  const int groups = setup.layout.groups();
  const parallel::MlaConfig mc = cfg.mla(setup.page_size);
  const int64_t n = setup.calib_tokens;
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    tokens[static_cast<size_t>(i)] = static_cast<int32_t>(
        (hash_uniform(cfg.seed, kCalibTokens, static_cast<uint64_t>(i)) + 1.0) * 0.5 *
        static_cast<double>(cfg.vocab - 1));
  // The calibration prompt through the full model on this rank; each layer's normalized input
  // gives the latents (for PCA) and the absorbed queries (for mu).
  PrefillModel calib(cfg, PrefillLayout{PrefillSharding::kHeads, 1, 1}, self);
  std::vector<std::vector<float>> inputs(static_cast<size_t>(cfg.layers));
  PrefillHooks hooks;
  hooks.on_layer_input = [&](int64_t l, const TensorView& h) {
    std::vector<float>& in = inputs[static_cast<size_t>(l)];
    in.resize(static_cast<size_t>(h.numel()));
    const int64_t shape[] = {h.size(0), h.size(1)};
    ops::tensor_copy(TensorView(in.data(), DType::kFloat32, Device::cpu(), shape), h);
  };
  calib.run(tokens, {}, hooks);
  std::vector<parallel::TplaReparam> out;
  for (int64_t l = 0; l < cfg.layers; ++l) {
    const parallel::MlaWeights& w = calib.weights().layers[static_cast<size_t>(l)].mla;
    const float* x = inputs[static_cast<size_t>(l)].data();
    // Normalized latents c = RMSNorm(x W_DKV) (no gamma), as the cache holds them.
    std::vector<float> lat(static_cast<size_t>(n * mc.kv_lora_rank));
    const int64_t xs[] = {n, mc.hidden}, ls[] = {n, mc.kv_lora_rank};
    const TensorView lv(lat.data(), DType::kFloat32, Device::cpu(), ls);
    ops::matmul(TensorView(const_cast<float*>(x), DType::kFloat32, Device::cpu(), xs), w.w_dkv, lv);
    ops::rms_norm(lv, TensorView{}, lv, mc.rms_eps);
    const std::vector<float> qlat = parallel::mla_absorbed_queries(mc, w, x, n);
    out.push_back(parallel::make_tpla_reparam(mc.kv_lora_rank, groups, setup.rotation,
                                              ModelWeights::layer_seed(cfg, l), lat.data(), n,
                                              qlat.data(), n * mc.heads));
  }
  return out;
}

uint64_t reparam_hash(std::span<const parallel::TplaReparam> reparams) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a 64
  auto feed = [&](const void* p, size_t bytes) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) {
      h ^= b[i];
      h *= 1099511628211ull;
    }
  };
  for (const parallel::TplaReparam& rp : reparams) {
    feed(&rp.groups, sizeof(rp.groups));
    for (double u : rp.u) {
      const float f = static_cast<float>(u);
      feed(&f, sizeof(f));
    }
    for (float mu : rp.mu) feed(&mu, sizeof(mu));
  }
  return h;
}

// ---- decode ---------------------------------------------------------------------------------

namespace {

RankSlice decode_slice(const ModelConfig& cfg, const DecodeLayout& d, int rank) {
  switch (d.sharding) {
    case DecodeSharding::kHeads:
    case DecodeSharding::kMlaTp:
      return RankSlice::head_parallel(cfg, rank, d.ranks);
    case DecodeSharding::kDecodeCp:
      return RankSlice::cache_parallel(cfg, rank, d.ranks);
    case DecodeSharding::kTpla:
      return RankSlice::tpla(cfg, rank, d.ranks, d.groups());
  }
  return RankSlice::full(cfg);
}

parallel::MlaSharding mla_sharding(DecodeSharding s) {
  switch (s) {
    case DecodeSharding::kTpla:
      return parallel::MlaSharding::kTpla;
    case DecodeSharding::kDecodeCp:
      return parallel::MlaSharding::kDecodeCp;
    default:
      return parallel::MlaSharding::kMlaTp;
  }
}

void validate_decode(const ModelConfig& cfg, const DecodeSetup& setup) {
  cfg.validate();
  const DecodeLayout& d = setup.layout;
  validate_layouts(cfg.geometry(setup.page_size), PrefillLayout{}, d);
  if (cfg.family == ModelFamily::kGqa && d.sharding == DecodeSharding::kHeads) {
    // Whole GQA groups per rank (or one KV head shared by whole query splits), so each rank's
    // paged decode maps its query heads onto its KV heads uniformly.
    DISTATTN_CHECK(
        cfg.heads % d.ranks == 0 && (cfg.kv_heads % d.ranks == 0 || d.ranks % cfg.kv_heads == 0),
        "decode-sharding heads over ", d.ranks, " decode ranks needs --heads (", cfg.heads,
        ") divisible by the decode ranks and --kv-heads (", cfg.kv_heads,
        ") a multiple or a divisor of them: change the rank split or use "
        "--decode-sharding decode-cp");
  }
  if (cfg.family == ModelFamily::kMla) {
    const int parts = d.sharding == DecodeSharding::kTpla    ? d.ranks / d.groups()
                      : d.sharding == DecodeSharding::kMlaTp ? d.ranks
                                                             : d.ranks;
    DISTATTN_CHECK(cfg.heads % parts == 0, decode_sharding_name(d.sharding), " over ", d.ranks,
                   " decode ranks splits the ", cfg.heads, " heads ", parts,
                   " ways: use a rank count that divides --heads");
  }
}

}  // namespace

struct DecodeModel::Impl {
  ModelConfig cfg;
  Device device;
  DecodeSetup setup;
  std::shared_ptr<comm::Communicator> group;
  // MLA
  parallel::MlaConfig mcfg;
  parallel::MlaDecodeSetup msetup;
  std::vector<parallel::MlaRankWeights> mla;
  std::vector<parallel::TplaReparam> reparams;
  std::unique_ptr<comm::Communicator> latent_comm;
};

DecodeModel::DecodeModel(const ModelConfig& cfg, const DecodeSetup& setup,
                         std::shared_ptr<comm::Communicator> group,
                         std::vector<parallel::TplaReparam> reparams, Device device)
    : impl_(std::make_unique<Impl>()) {
  DISTATTN_CHECK(group != nullptr, "DecodeModel: a group communicator is required");
  DISTATTN_CHECK(group->size() == setup.layout.ranks, "DecodeModel: the layout has ",
                 setup.layout.ranks, " ranks but the group has ", group->size());
  validate_decode(cfg, setup);
  Impl& m = *impl_;
  m.cfg = cfg;
  m.setup = setup;
  m.group = group;
  const int rank = group->rank();
  weights_ = ModelWeights::generate(cfg, decode_slice(cfg, setup.layout, rank), device);
  m.device = device;
  if (cfg.family == ModelFamily::kMla) {
    m.mcfg = cfg.mla(setup.page_size);
    m.msetup.sharding = mla_sharding(setup.layout.sharding);
    m.msetup.tpla_groups = setup.layout.groups();
    m.msetup.tpla_norm = setup.norm;
    m.msetup.cache_dtype = cfg.dtype;
    m.reparams = std::move(reparams);
    if (m.msetup.sharding == parallel::MlaSharding::kTpla)
      DISTATTN_CHECK(static_cast<int64_t>(m.reparams.size()) == cfg.layers,
                     "DecodeModel: TPLA needs one TplaReparam per layer (", cfg.layers, "), got ",
                     m.reparams.size());
    for (int64_t l = 0; l < cfg.layers; ++l)
      m.mla.push_back(parallel::make_mla_rank_weights(
          m.mcfg, weights_.layers[static_cast<size_t>(l)].mla, m.msetup, rank, group->size(),
          m.reparams.empty() ? nullptr : &m.reparams[static_cast<size_t>(l)]));
    if (m.msetup.sharding == parallel::MlaSharding::kTpla) {
      // The ranks of the other latent groups sharing this rank's heads (as MlaDecoder).
      const int hparts = group->size() / m.msetup.tpla_groups;
      m.latent_comm = group->split(rank % hparts, rank / hparts);
    }
  }
}

DecodeModel::~DecodeModel() = default;

int64_t DecodeModel::pool_units() const {
  return decode_units(impl_->cfg.geometry(impl_->setup.page_size), impl_->setup.layout,
                      impl_->group->rank())
      .units();
}

DecodeOutput DecodeModel::step(const DecodeBatch& batch, KvPool& pool,
                               const std::function<void()>& progress) {
  Impl& m = *impl_;
  const ModelConfig& cfg = m.cfg;
  const int64_t b = batch.size(), hid = cfg.hidden;
  DISTATTN_CHECK(static_cast<int64_t>(batch.positions.size()) == b &&
                     static_cast<int64_t>(batch.append_rows.size()) == b,
                 "DecodeModel::step: tokens, positions and append_rows need one entry per "
                 "sequence");
  DISTATTN_CHECK(pool.units() == pool_units() && pool.geometry().layers == cfg.layers,
                 "DecodeModel::step: the pool stores ", pool.units(), " units for ",
                 pool.geometry().layers, " layers; this rank needs ", pool_units(), " for ",
                 cfg.layers);
  DecodeOutput res;
  if (b == 0) return res;
  const RankSlice& sl = weights_.slice;
  const Device dev = m.device;
  DISTATTN_CHECK(pool.k(0).device == dev, "DecodeModel::step: the pool is on ",
                 pool.k(0).device.str(), " but the model on ", dev.str());
  // Page tables and lengths go where the kernels read them.
  const Tensor table = dev.is_cpu() ? batch.page_table : to_device(batch.page_table, dev);
  const Tensor lens = dev.is_cpu() ? batch.seq_lens : to_device(batch.seq_lens, dev);
  Tensor x = Tensor::empty({b, hid}, DType::kFloat32, dev);
  ops::embedding(weights_.embed, batch.tokens, x);
  Tensor h = Tensor::empty({b, hid}, DType::kFloat32, dev);
  const int64_t ps = pool.page_size();
  for (int64_t l = 0; l < cfg.layers; ++l) {
    const LayerWeights& lw = weights_.layers[static_cast<size_t>(l)];
    ops::rms_norm(x, lw.attn_norm, h, cfg.rms_eps);
    if (cfg.family == ModelFamily::kMla) {
      Tensor y = Tensor::empty({b, hid}, DType::kFloat32, dev);
      parallel::MlaStepArgs a;
      a.x = h;
      a.positions = batch.positions;
      a.append_rows = batch.append_rows;
      a.cache.pages = pool.k(l);
      a.cache.page_table = table;
      a.cache.seq_lens = lens;
      a.cache.latent_dim = pool.units();
      a.y = y;
      parallel::mla_decode_step(m.mcfg, m.mla[static_cast<size_t>(l)], m.msetup,
                                m.reparams.empty() ? nullptr : &m.reparams[static_cast<size_t>(l)],
                                *m.group, m.latent_comm.get(), a);
      ops::tensor_add(x, y);
    } else {
      const int64_t d = cfg.head_dim, qa = sl.attn_heads.size(), ka = sl.kv_heads.size();
      Tensor qkv = Tensor::empty({b, (qa + 2 * ka) * d}, DType::kFloat32, dev);
      ops::matmul(h, lw.w_qkv, qkv);
      const TensorView q32 = heads_view(qkv, 0, qa, d), k32 = heads_view(qkv, qa * d, ka, d);
      const TensorView v32 = heads_view(qkv, (qa + ka) * d, ka, d);
      ops::rope(q32, batch.positions, cfg.rope_theta);
      ops::rope(k32, batch.positions, cfg.rope_theta);
      for (int64_t i = 0; i < b; ++i) {
        const int64_t r = batch.append_rows[static_cast<size_t>(i)];
        if (r < 0) continue;
        ops::tensor_copy(pool.k(l).slice(0, r / ps, 1).slice(1, r % ps, 1).reshape({ka, d}),
                         k32.slice(0, i, 1).reshape({ka, d}));
        ops::tensor_copy(pool.v(l).slice(0, r / ps, 1).slice(1, r % ps, 1).reshape({ka, d}),
                         v32.slice(0, i, 1).reshape({ka, d}));
      }
      Tensor q = Tensor::empty({b, 1, qa, d}, cfg.dtype, dev);
      ops::tensor_copy(q.view().reshape({b, qa, d}), q32);
      Tensor out = Tensor::empty({b, 1, qa, d}, DType::kFloat32, dev);
      Tensor lse = Tensor::empty({b, qa, 1}, DType::kFloat32, dev);
      ops::PagedKV cache{pool.k(l), pool.v(l), table, lens};
      if (m.setup.layout.sharding == DecodeSharding::kDecodeCp)
        parallel::paged_decode_cp_attention(*m.group, q, cache, out, lse);
      else
        ops::attention_decode_paged(q, cache, out, lse);
      // The projection rows this rank holds (decode-CP: a part of the attended heads).
      const int64_t p0 = sl.proj_heads.begin - sl.attn_heads.begin, pn = sl.proj_heads.size();
      const int64_t shape[] = {b, pn * d}, strides[] = {qa * d, 1};
      add_projection(
          lw, sl, x,
          TensorView(out.data_as<float>() + p0 * d, DType::kFloat32, dev, shape, strides),
          m.group.get());
    }
    add_mlp(lw, sl, x, m.group.get(), cfg.rms_eps);
    if (progress) progress();
  }
  res.next_tokens.resize(static_cast<size_t>(b));
  res.hidden.resize(static_cast<size_t>(b * hid));
  final_rows(weights_, x, 0, b, res.next_tokens.data(), res.hidden.data());
  return res;
}

}  // namespace distattn::serving
