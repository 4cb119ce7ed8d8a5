// MLA decode under MLA-TP, TPLA and decode-CP (see distattn/parallel/mla.h, docs/MLA.md).
// Device-neutral: only ops::* and the Communicator.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "distattn/ops/attention.h"
#include "distattn/ops/elementwise.h"
#include "distattn/ops/mla.h"
#include "distattn/parallel/decode_cp.h"
#include "distattn/parallel/mla.h"
#include "src/parallel/mla_internal.h"

namespace distattn::parallel {

using namespace mla_detail;

void decode_cp_attention(comm::Communicator& cp, const TensorView& q_lat, const TensorView& q_pe,
                         const ops::MlaPagedCache& local, const TensorView& out,
                         const TensorView& lse, const ops::MlaDecodeOptions& opts) {
  DISTATTN_CHECK(out.ndim == 3 && out.is_contiguous() && lse.ndim == 2 && lse.is_contiguous() &&
                     out.dtype == DType::kFloat32 && lse.dtype == DType::kFloat32,
                 "decode_cp_attention: out must be packed fp32 [B, H, Dl] and lse packed fp32 "
                 "[B, H]; got ",
                 out.str(), ", ", lse.str());
  DISTATTN_CHECK(lse.device == out.device && q_lat.device == out.device,
                 "decode_cp_attention: q_lat, out and lse must be on one device; got ", q_lat.str(),
                 ", ", out.str(), ", ", lse.str());
  const int64_t b = out.size(0), h = out.size(1), dl = out.size(2);
  ops::mla_decode(q_lat, q_pe, local, out, lse, opts);
  // The partials as [B, 1, H, Dl] / [B, H, 1] rows, merged across the ranks in place.
  merge_partials_across(cp, TensorView(out.data, DType::kFloat32, out.device, {b, 1, h, dl}),
                        TensorView(lse.data, DType::kFloat32, lse.device, {b, h, 1}), opts.stream);
}

struct MlaDecoder::Impl : MlaRankWeights {
  MlaConfig cfg;
  MlaDecodeSetup setup;
  std::shared_ptr<comm::Communicator> tp;
  std::unique_ptr<comm::Communicator> latent_comm;  // TPLA: ranks of the other latent groups
  const TplaReparam* rp = nullptr;
  int rank = 0, size = 1;
  int64_t dl_full = 0;
};

namespace {
// dst[r, :] = src[r, col0 : col0 + cols] for a [rows, ld] matrix.
Tensor copy_cols(const float* src, int64_t rows, int64_t ld, int64_t col0, int64_t cols) {
  Tensor t = Tensor::empty({rows, cols}, DType::kFloat32);
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(t.data_as<float>() + i * cols, src + i * ld + col0, static_cast<size_t>(cols) * 4);
  return t;
}
}  // namespace

MlaRankWeights make_mla_rank_weights(const MlaConfig& cfg, const MlaWeights& weights,
                                     const MlaDecodeSetup& setup, int rank, int size,
                                     const TplaReparam* reparam) {
  cfg.validate();
  DISTATTN_CHECK(size >= 1 && rank >= 0 && rank < size, "make_mla_rank_weights: rank ", rank,
                 " of ", size);
  MlaRankWeights m;
  const int p = size;
  const int64_t H = cfg.heads, nope = cfg.qk_nope, rope = cfg.qk_rope, dv = cfg.v_head;
  const int64_t hid = cfg.hidden, dlf = cfg.kv_lora_rank;
  const int64_t q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : hid;
  switch (setup.sharding) {
    case MlaSharding::kMlaTp:
      DISTATTN_CHECK(H % p == 0, "MLA-TP: heads (", H, ") must be divisible by TP (", p, ")");
      m.attn_h0 = m.proj_h0 = rank * (H / p);
      m.attn_hn = m.proj_hn = H / p;
      m.dl = dlf;
      break;
    case MlaSharding::kDecodeCp:
      DISTATTN_CHECK(H % p == 0, "decode-CP: heads (", H, ") must be divisible by the ranks (", p,
                     ") for the split output projection");
      m.attn_h0 = 0;
      m.attn_hn = H;
      m.proj_h0 = rank * (H / p);
      m.proj_hn = H / p;
      m.dl = dlf;
      break;
    case MlaSharding::kTpla: {
      const int g = setup.tpla_groups > 0 ? setup.tpla_groups : p;
      DISTATTN_CHECK(p % g == 0, "TPLA: groups (", g, ") must divide TP (", p,
                     "): use g = TP or a divisor such as 2");
      DISTATTN_CHECK(dlf % g == 0, "TPLA: groups (", g, ") must divide kv_lora_rank (", dlf, ")");
      const int hparts = p / g;
      DISTATTN_CHECK(H % hparts == 0, "TPLA: heads (", H, ") must split ", hparts,
                     " ways inside a latent group (TP / g)");
      DISTATTN_CHECK(reparam != nullptr && reparam->groups == g && reparam->latent == dlf,
                     "TPLA: pass a TplaReparam made for ", g, " groups and latent width ", dlf);
      m.groups = g;
      m.group = rank / hparts;
      const int hp = rank % hparts;
      m.attn_h0 = m.proj_h0 = hp * (H / hparts);
      m.attn_hn = m.proj_hn = H / hparts;
      m.dl = dlf / g;
      DISTATTN_CHECK(static_cast<int64_t>(reparam->mu.size()) == g,
                     "TPLA: the TplaReparam must hold one mu per group (", g, "), got ",
                     reparam->mu.size());
      break;
    }
  }
  weights.check(cfg, m.attn_h0, m.attn_hn);
  const TplaReparam* rp = setup.sharding == MlaSharding::kTpla ? reparam : nullptr;
  const int64_t lo = m.attn_h0 - weights.head_begin;
  const int64_t wn = weights.head_count;
  if (cfg.q_lora_rank > 0) m.w_dq = to_device(weights.w_dq, Device::cpu());
  m.w_uq = copy_cols(weights.w_uq.data_as<float>(), q_in, wn * nope, lo * nope, m.attn_hn * nope);
  m.w_qr = copy_cols(weights.w_qr.data_as<float>(), q_in, wn * rope, lo * rope, m.attn_hn * rope);
  m.w_kr = to_device(weights.w_kr, Device::cpu());

  // Latent-space factor F [dlf, dl] = diag(gamma) U[:, slice] (U = I unless TPLA).
  const int64_t s0 = m.group * m.dl;
  std::vector<float> uslice(static_cast<size_t>(dlf * m.dl), 0.0f);
  for (int64_t i = 0; i < dlf; ++i)
    for (int64_t j = 0; j < m.dl; ++j)
      uslice[static_cast<size_t>(i * m.dl + j)] =
          rp ? static_cast<float>(rp->u[static_cast<size_t>(i * dlf + s0 + j)])
             : (i == s0 + j ? 1.0f : 0.0f);
  m.w_dkv = Tensor::empty({hid, m.dl}, DType::kFloat32);
  gemm(hid, m.dl, dlf, weights.w_dkv.data_as<float>(), dlf, uslice.data(), m.dl,
       m.w_dkv.data_as<float>(), m.dl);
  const float* gamma = weights.gamma.data_as<float>();
  for (int64_t i = 0; i < dlf; ++i)
    for (int64_t j = 0; j < m.dl; ++j) uslice[static_cast<size_t>(i * m.dl + j)] *= gamma[i];
  m.wuk = Tensor::empty({m.attn_hn, nope, m.dl}, DType::kFloat32);
  gemm(m.attn_hn * nope, m.dl, dlf, weights.w_uk.data_as<float>() + lo * nope * dlf, dlf,
       uslice.data(), m.dl, m.wuk.data_as<float>(), m.dl);
  const int64_t plo = m.proj_h0 - weights.head_begin;
  m.wuv = Tensor::empty({m.proj_hn, dv, m.dl}, DType::kFloat32);
  gemm(m.proj_hn * dv, m.dl, dlf, weights.w_uv.data_as<float>() + plo * dv * dlf, dlf,
       uslice.data(), m.dl, m.wuv.data_as<float>(), m.dl);
  m.w_o = Tensor::empty({m.proj_hn * dv, hid}, DType::kFloat32);
  std::memcpy(m.w_o.data(), weights.w_o.data_as<float>() + plo * dv * hid,
              static_cast<size_t>(m.proj_hn * dv * hid) * 4);
  return m;
}

MlaDecoder::MlaDecoder(const MlaConfig& cfg, const MlaWeights& weights, const MlaDecodeSetup& setup,
                       std::shared_ptr<comm::Communicator> tp, const TplaReparam* reparam)
    : impl_(std::make_unique<Impl>()) {
  DISTATTN_CHECK(tp != nullptr, "MlaDecoder: a TP communicator is required");
  DISTATTN_CHECK(setup.capacity > 0,
                 "MlaDecoder: setup.capacity (prompt + decode tokens) must "
                 "be > 0");
  Impl& m = *impl_;
  static_cast<MlaRankWeights&>(m) =
      make_mla_rank_weights(cfg, weights, setup, tp->rank(), tp->size(), reparam);
  m.cfg = cfg;
  m.setup = setup;
  m.tp = tp;
  m.rank = tp->rank();
  m.size = tp->size();
  m.dl_full = cfg.kv_lora_rank;
  m.rp = setup.sharding == MlaSharding::kTpla ? reparam : nullptr;
  groups_ = m.groups;
  group_ = m.group;
  if (setup.sharding == MlaSharding::kTpla) {
    // Ranks sharing this head part, one per latent group (rank in it = group). Collective:
    // only after every argument check, so a bad setup throws on all ranks before it.
    const int hparts = m.size / groups_;
    m.latent_comm = tp->split(m.rank % hparts, group_);
  }
  head_begin_ = m.attn_h0;
  head_count_ = m.attn_hn;
  latent_local_ = m.dl;

  const int64_t cap =
      setup.sharding == MlaSharding::kDecodeCp
          ? decode_cp_local_pages(setup.capacity, cfg.page_size, m.rank, m.size) * cfg.page_size
          : setup.capacity;
  cache_ = MlaCache(cap, cfg.page_size, m.dl, cfg.qk_rope, setup.cache_dtype);
}

MlaDecoder::~MlaDecoder() = default;

void MlaDecoder::load_prefill(const MlaCache& full) {
  Impl& m = *impl_;
  DISTATTN_CHECK(full.latent_dim() == m.dl_full && full.rope_dim() == m.cfg.qk_rope &&
                     full.page_size() == m.cfg.page_size,
                 "MlaDecoder::load_prefill: the prefill cache layout (latent ", full.latent_dim(),
                 ", rope ", full.rope_dim(), ", page ", full.page_size(),
                 ") does not match the model (", m.dl_full, ", ", m.cfg.qk_rope, ", ",
                 m.cfg.page_size, ")");
  DISTATTN_CHECK(length_ == 0, "MlaDecoder::load_prefill: the decoder already holds ", length_,
                 " tokens; load the prefill cache before decoding");
  DISTATTN_CHECK(full.dtype() == m.setup.cache_dtype, "MlaDecoder::load_prefill: cache dtype ",
                 dtype_name(full.dtype()), " differs from setup.cache_dtype ",
                 dtype_name(m.setup.cache_dtype));
  switch (m.setup.sharding) {
    case MlaSharding::kMlaTp: {
      MlaCache c(m.setup.capacity, full.page_size(), full.latent_dim(), full.rope_dim(),
                 full.dtype());
      std::vector<float> row(static_cast<size_t>(full.latent_dim() + full.rope_dim()));
      for (int64_t t = 0; t < full.length(); ++t) {
        full.read_row(t, row.data());
        c.append(row.data(), row.data() + full.latent_dim(), 1);
      }
      cache_ = std::move(c);
      break;
    }
    case MlaSharding::kTpla:
      cache_ = reshard_to_tpla(full, *m.rp, group_, m.setup.capacity);
      break;
    case MlaSharding::kDecodeCp:
      cache_ = reshard_to_decode_cp(full, m.rank, m.size, m.setup.capacity);
      break;
  }
  length_ = full.length();
}

void MlaDecoder::step(const float* x, float* y) {
  Impl& m = *impl_;
  const MlaConfig& cfg = m.cfg;
  const int64_t nope = cfg.qk_nope, rope = cfg.qk_rope, dv = cfg.v_head, hid = cfg.hidden;
  const int64_t q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : hid;
  const int64_t ha = m.attn_hn, dl = m.dl, pos = length_;
  DISTATTN_CHECK(x != nullptr && y != nullptr,
                 "MlaDecoder::step: x and y must point to hidden-sized fp32 host buffers");
  DISTATTN_CHECK(pos < m.setup.capacity, "MlaDecoder::step: the sequence reached its capacity ",
                 m.setup.capacity, "; construct the decoder with a larger setup.capacity");

  // Queries of the attended heads.
  std::vector<float> cq_buf;
  const float* cq = x;
  if (cfg.q_lora_rank > 0) {
    cq_buf.resize(static_cast<size_t>(q_in));
    gemm(1, q_in, hid, x, hid, m.w_dq.data_as<float>(), q_in, cq_buf.data(), q_in);
    rms_normalize_rows(cq_buf.data(), 1, q_in, q_in, cfg.rms_eps);
    cq = cq_buf.data();
  }
  std::vector<float> q_nope(static_cast<size_t>(ha * nope));
  Tensor q_pe = Tensor::empty({1, ha, std::max<int64_t>(rope, 1)}, DType::kFloat32);
  gemm(1, ha * nope, q_in, cq, q_in, m.w_uq.data_as<float>(), ha * nope, q_nope.data(), ha * nope);
  if (rope > 0) {
    gemm(1, ha * rope, q_in, cq, q_in, m.w_qr.data_as<float>(), ha * rope, q_pe.data_as<float>(),
         rope);
    for (int64_t h = 0; h < ha; ++h)
      rope_inplace(q_pe.data_as<float>() + h * rope, rope, pos, cfg.rope_theta);
  }

  // The new token's latent (only the page owner stores it under decode-CP).
  const bool owner =
      m.setup.sharding != MlaSharding::kDecodeCp || (pos / cfg.page_size) % m.size == m.rank;
  if (owner) {
    std::vector<float> c(static_cast<size_t>(dl)), kpe(static_cast<size_t>(rope));
    gemm(1, dl, hid, x, hid, m.w_dkv.data_as<float>(), dl, c.data(), dl);
    double ss = 0;
    for (float v : c) ss += static_cast<double>(v) * v;
    // The slice is the whole latent unless TPLA has more than one group.
    TplaNorm norm = TplaNorm::kExact;
    if (m.setup.sharding == MlaSharding::kTpla && groups_ > 1) {
      norm = m.setup.tpla_norm;
      // Exact RMSNorm: one scalar all-reduce of the slices' sums of squares.
      if (norm == TplaNorm::kExact)
        m.latent_comm->all_reduce(&ss, &ss, 1, DType::kFloat64, comm::ReduceOp::kSum);
    }
    tpla_normalize_slice(c.data(), dl, norm, ss, m.dl_full, cfg.rms_eps);
    if (rope > 0) {
      gemm(1, rope, hid, x, hid, m.w_kr.data_as<float>(), rope, kpe.data(), rope);
      rope_inplace(kpe.data(), rope, pos, cfg.rope_theta);
    }
    cache_.append(c.data(), kpe.data(), 1);
  }
  ++length_;

  // Absorbed latent queries: q_lat[h] = q_nope[h] W_UK'[h].
  Tensor q_lat = Tensor::empty({1, ha, dl}, DType::kFloat32);
  for (int64_t h = 0; h < ha; ++h)
    gemm(1, dl, nope, q_nope.data() + h * nope, nope, m.wuk.data_as<float>() + h * nope * dl, dl,
         q_lat.data_as<float>() + h * dl, dl);
  Tensor o_lat = Tensor::empty({1, ha, dl}, DType::kFloat32);
  Tensor lse = Tensor::empty({1, ha}, DType::kFloat32);
  ops::MlaDecodeOptions opts;
  opts.softmax_scale = cfg.scale();
  TensorView qpe_v = rope > 0 ? q_pe.view() : TensorView{};
  if (m.setup.sharding == MlaSharding::kDecodeCp) {
    decode_cp_attention(*m.tp, q_lat, qpe_v, cache_.view(), o_lat, lse, opts);
  } else if (m.setup.sharding == MlaSharding::kTpla && m.setup.tpla_global_softmax) {
    // Partial latent logits summed over the groups, one softmax, sharded values.
    const int64_t len = cache_.length(), w = dl + rope;
    std::vector<double> s(static_cast<size_t>(ha * len));
    std::vector<float> row(static_cast<size_t>(w));
    for (int64_t t = 0; t < len; ++t) {
      cache_.read_row(t, row.data());
      for (int64_t h = 0; h < ha; ++h) {
        double a = 0;
        const float* ql = q_lat.data_as<float>() + h * dl;
        for (int64_t j = 0; j < dl; ++j)
          a += static_cast<double>(ql[j]) * row[static_cast<size_t>(j)];
        s[static_cast<size_t>(h * len + t)] = a;
      }
    }
    m.latent_comm->all_reduce(s.data(), s.data(), s.size(), DType::kFloat64, comm::ReduceOp::kSum);
    std::fill(o_lat.data_as<float>(), o_lat.data_as<float>() + ha * dl, 0.0f);
    for (int64_t h = 0; h < ha; ++h) {
      double mx = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        cache_.read_row(t, row.data());
        double pe = 0;
        for (int64_t j = 0; j < rope; ++j)
          pe += static_cast<double>(q_pe.data_as<float>()[h * rope + j]) *
                row[static_cast<size_t>(dl + j)];
        double& st = s[static_cast<size_t>(h * len + t)];
        st = cfg.scale() * (st + pe);
        mx = std::max(mx, st);
      }
      double l = 0;
      for (int64_t t = 0; t < len; ++t) l += std::exp(s[static_cast<size_t>(h * len + t)] - mx);
      float* o = o_lat.data_as<float>() + h * dl;
      for (int64_t t = 0; t < len; ++t) {
        cache_.read_row(t, row.data());
        const float pr = static_cast<float>(std::exp(s[static_cast<size_t>(h * len + t)] - mx) / l);
        for (int64_t j = 0; j < dl; ++j) o[j] += pr * row[static_cast<size_t>(j)];
      }
    }
  } else if (m.setup.sharding == MlaSharding::kTpla) {
    tpla_shard_attention(*m.rp, group_, q_lat, qpe_v, cache_.view(), o_lat, lse, opts);
  } else {
    ops::mla_decode(q_lat, qpe_v, cache_.view(), o_lat, lse, opts);
  }

  // o[h] = W_UV'[h] o_lat[h]; y = sum_h o[h] W_O[h]; all-reduce over TP.
  std::vector<float> o(static_cast<size_t>(m.proj_hn * dv));
  const int64_t off = m.proj_h0 - m.attn_h0;
  for (int64_t h = 0; h < m.proj_hn; ++h)
    gemm_bt(1, dv, dl, o_lat.data_as<float>() + (off + h) * dl, dl,
            m.wuv.data_as<float>() + h * dv * dl, dl, o.data() + h * dv, dv);
  gemm(1, hid, m.proj_hn * dv, o.data(), m.proj_hn * dv, m.w_o.data_as<float>(), hid, y, hid);
  m.tp->all_reduce(y, y, static_cast<size_t>(hid), DType::kFloat32, comm::ReduceOp::kSum);
}

int64_t MlaDecoder::kv_bytes_read_formula(const MlaConfig& cfg, MlaSharding s, int tp, int groups,
                                          int rank, int64_t len, DType dtype) {
  const int64_t elt = static_cast<int64_t>(dtype_size(dtype)), ps = cfg.page_size;
  const int64_t dl = cfg.kv_lora_rank, dr = cfg.qk_rope;
  switch (s) {
    case MlaSharding::kMlaTp:
      return len * (dl + dr) * elt;
    case MlaSharding::kTpla:
      return len * (dl / (groups > 0 ? groups : tp) + dr) * elt;
    case MlaSharding::kDecodeCp: {
      // Full pages p < len/ps with p % tp == rank, plus the partial last page if it is ours.
      const int64_t full = len / ps, rem = len % ps;
      int64_t tokens = (full > rank ? (full - rank + tp - 1) / tp : 0) * ps;
      if (rem > 0 && full % tp == rank) tokens += rem;
      return tokens * (dl + dr) * elt;
    }
  }
  return 0;
}

int64_t MlaDecoder::kv_memory_formula(const MlaConfig& cfg, MlaSharding s, int tp, int groups,
                                      int rank, int64_t capacity, DType dtype) {
  const int64_t elt = static_cast<int64_t>(dtype_size(dtype)), ps = cfg.page_size;
  const int64_t dl = cfg.kv_lora_rank, dr = cfg.qk_rope;
  const int64_t pages = (capacity + ps - 1) / ps;
  switch (s) {
    case MlaSharding::kMlaTp:
      return pages * ps * (dl + dr) * elt;
    case MlaSharding::kTpla:
      return pages * ps * (dl / (groups > 0 ? groups : tp) + dr) * elt;
    case MlaSharding::kDecodeCp:
      return decode_cp_local_pages(capacity, ps, rank, tp) * ps * (dl + dr) * elt;
  }
  return 0;
}

}  // namespace distattn::parallel
