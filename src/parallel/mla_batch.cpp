// Batched MLA decode step (distattn/parallel/mla.h: mla_decode_step). Device-neutral except
// for the per-sequence latent normalization, which runs on host rows (the latent of B new
// tokens: B x 512 values).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "distattn/ops/dense.h"
#include "distattn/ops/elementwise.h"
#include "distattn/ops/mla.h"
#include "distattn/parallel/mla.h"

namespace distattn::parallel {

namespace {

TensorView rows_view(const Tensor& t, int64_t rows, int64_t cols, int64_t ld, int64_t col0 = 0) {
  const int64_t shape[] = {rows, cols}, strides[] = {ld, 1};
  return TensorView(t.data_as<float>() + col0, DType::kFloat32, t.device(), shape, strides);
}

}  // namespace

void mla_decode_step(const MlaConfig& cfg, const MlaRankWeights& w, const MlaDecodeSetup& setup,
                     const TplaReparam* reparam, comm::Communicator& tp,
                     comm::Communicator* latent_comm, const MlaStepArgs& a) {
  const char* op = "mla_decode_step";
  DISTATTN_CHECK(!setup.tpla_global_softmax, op,
                 ": tpla_global_softmax is a test mode of MlaDecoder only");
  DISTATTN_CHECK(a.x.ndim == 2 && a.x.size(1) == cfg.hidden && a.x.dtype == DType::kFloat32, op,
                 ": x must be fp32 [B, hidden=", cfg.hidden, "]; got ", a.x.str());
  const int64_t b = a.x.size(0);
  DISTATTN_CHECK(a.y.ndim == 2 && a.y.size(0) == b && a.y.size(1) == cfg.hidden &&
                     a.y.dtype == DType::kFloat32 && a.y.is_contiguous(),
                 op, ": y must be packed fp32 [", b, ", ", cfg.hidden, "]; got ", a.y.str());
  DISTATTN_CHECK(static_cast<int64_t>(a.positions.size()) == b &&
                     static_cast<int64_t>(a.append_rows.size()) == b,
                 op, ": positions and append_rows need ", b, " entries (one per sequence)");
  DISTATTN_CHECK(
      a.cache.pages.ndim == 3 && a.cache.latent_dim == w.dl && a.cache.rope_dim() == cfg.qk_rope,
      op, ": the cache pages must be [pages, page_size, ", w.dl, " + ", cfg.qk_rope,
      "] with latent_dim ", w.dl, "; got ", a.cache.pages.str(), " latent_dim ",
      a.cache.latent_dim);
  DISTATTN_CHECK(
      setup.sharding != MlaSharding::kTpla || (reparam != nullptr && reparam->groups == w.groups),
      op, ": TPLA needs the TplaReparam the weights were built with");
  if (b == 0) return;
  const Device dev = a.x.device;
  const int64_t nope = cfg.qk_nope, rope = cfg.qk_rope, dv = cfg.v_head, hid = cfg.hidden;
  const int64_t q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : hid;
  const int64_t ha = w.attn_hn, dl = w.dl, dlf = cfg.kv_lora_rank;
  const int64_t total_pages_rows = a.cache.pages.size(0) * a.cache.page_size();
  for (int64_t i = 0; i < b; ++i)
    DISTATTN_CHECK(a.append_rows[static_cast<size_t>(i)] < total_pages_rows, op, ": append row ",
                   a.append_rows[static_cast<size_t>(i)], " of sequence ", i, " is past the ",
                   total_pages_rows, " rows of the cache");

  // Queries of the attended heads.
  TensorView cq = a.x;
  Tensor cq_buf;
  if (cfg.q_lora_rank > 0) {
    cq_buf = Tensor::empty({b, q_in}, DType::kFloat32, dev);
    ops::matmul(a.x, w.w_dq, cq_buf);
    ops::rms_norm(cq_buf, TensorView{}, cq_buf, cfg.rms_eps);
    cq = cq_buf.view();
  }
  Tensor q_nope = Tensor::empty({b, ha * nope}, DType::kFloat32, dev);
  ops::matmul(cq, w.w_uq, q_nope);
  Tensor q_pe = Tensor::empty({b, ha, std::max<int64_t>(rope, 1)}, DType::kFloat32, dev);
  if (rope > 0) {
    ops::matmul(cq, w.w_qr, q_pe.view().reshape({b, ha * rope}));
    ops::rope(q_pe, a.positions, cfg.rope_theta);
  }

  // The new tokens' latent rows [c (dl) | k_pe (rope)], normalized as MlaDecoder does.
  Tensor row = Tensor::empty({b, dl + rope}, DType::kFloat32, dev);
  ops::matmul(a.x, w.w_dkv, rows_view(row, b, dl, dl + rope));
  if (rope > 0) {
    ops::matmul(a.x, w.w_kr, rows_view(row, b, rope, dl + rope, dl));
    const int64_t shape[] = {b, 1, rope}, strides[] = {dl + rope, rope, 1};
    ops::rope(TensorView(row.data_as<float>() + dl, DType::kFloat32, dev, shape, strides),
              a.positions, cfg.rope_theta);
  }
  {
    // RMSNorm of the latent slice on host rows (one scalar per token crosses the latent
    // groups for TPLA's exact norm).
    Tensor host = to_device(rows_view(row, b, dl, dl + rope), Device::cpu());
    std::vector<double> ss(static_cast<size_t>(b), 0.0);
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < dl; ++j) {
        const double v = host.data_as<float>()[i * dl + j];
        ss[static_cast<size_t>(i)] += v * v;
      }
    TplaNorm norm = TplaNorm::kExact;
    if (setup.sharding == MlaSharding::kTpla && w.groups > 1) {
      norm = setup.tpla_norm;
      if (norm == TplaNorm::kExact) {
        DISTATTN_CHECK(latent_comm != nullptr, op,
                       ": TPLA's exact RMSNorm needs the latent-group communicator");
        latent_comm->all_reduce(ss.data(), ss.data(), ss.size(), DType::kFloat64,
                                comm::ReduceOp::kSum);
      }
    }
    for (int64_t i = 0; i < b; ++i)
      tpla_normalize_slice(host.data_as<float>() + i * dl, dl, norm, ss[static_cast<size_t>(i)],
                           dlf, cfg.rms_eps);
    ops::tensor_copy(rows_view(row, b, dl, dl + rope), host);
  }
  // Store each new row where this rank holds the token.
  const int64_t ps = a.cache.page_size();
  for (int64_t i = 0; i < b; ++i) {
    const int64_t r = a.append_rows[static_cast<size_t>(i)];
    if (r < 0) continue;
    TensorView dst = a.cache.pages.slice(0, r / ps, 1).slice(1, r % ps, 1);
    const int64_t shape[] = {1, 1, dl + rope};
    ops::tensor_copy(
        dst, TensorView(row.data_as<float>() + i * (dl + rope), DType::kFloat32, dev, shape));
  }

  // Absorbed latent queries: q_lat[:, h] = q_nope[:, h] W_UK'[h].
  Tensor q_lat = Tensor::empty({b, ha, dl}, DType::kFloat32, dev);
  for (int64_t h = 0; h < ha; ++h) {
    const int64_t wshape[] = {nope, dl};
    ops::matmul(
        rows_view(q_nope, b, nope, ha * nope, h * nope),
        TensorView(w.wuk.data_as<float>() + h * nope * dl, DType::kFloat32, w.wuk.device(), wshape),
        rows_view(q_lat, b, dl, ha * dl, h * dl));
  }
  Tensor o_lat = Tensor::empty({b, ha, dl}, DType::kFloat32, dev);
  Tensor lse = Tensor::empty({b, ha}, DType::kFloat32, dev);
  ops::MlaDecodeOptions opts;
  opts.softmax_scale = cfg.scale();
  const TensorView qpe_v = rope > 0 ? q_pe.view() : TensorView{};
  switch (setup.sharding) {
    case MlaSharding::kDecodeCp:
      decode_cp_attention(tp, q_lat, qpe_v, a.cache, o_lat, lse, opts);
      break;
    case MlaSharding::kTpla:
      tpla_shard_attention(*reparam, w.group, q_lat, qpe_v, a.cache, o_lat, lse, opts);
      break;
    case MlaSharding::kMlaTp:
      ops::mla_decode(q_lat, qpe_v, a.cache, o_lat, lse, opts);
      break;
  }

  // o[:, h] = W_UV'[h] o_lat[:, h]; y = sum_h o[:, h] W_O[h]; all-reduce over TP.
  Tensor o = Tensor::empty({b, w.proj_hn * dv}, DType::kFloat32, dev);
  const int64_t off = w.proj_h0 - w.attn_h0;
  for (int64_t h = 0; h < w.proj_hn; ++h) {
    const int64_t wshape[] = {dv, dl};
    ops::matmul(
        rows_view(o_lat, b, dl, ha * dl, (off + h) * dl),
        TensorView(w.wuv.data_as<float>() + h * dv * dl, DType::kFloat32, w.wuv.device(), wshape),
        rows_view(o, b, dv, w.proj_hn * dv, h * dv), {.transpose_b = true});
  }
  ops::matmul(o, w.w_o, a.y);
  tp.all_reduce(a.y, a.y, comm::ReduceOp::kSum);
}

}  // namespace distattn::parallel
