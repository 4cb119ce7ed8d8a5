// Naive fp64 attention (see reference.h). Deliberately simple: every score is materialized
// and every sum runs in double, so that it can serve as the oracle for the tiled kernels and
// for every distributed strategy. Not for production sizes.
#include "kernels/cpu/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace distattn::kernels::cpu {

namespace {

// A host fp64 packed copy of any float view (CPU or CUDA, any strides).
Tensor host_fp64(const TensorView& t, const char* name) {
  DISTATTN_CHECK(dtype_is_floating(t.dtype), "reference attention: ", name,
                 " must be a float tensor (fp32/fp64/bf16/fp16), got ", t.str());
  DISTATTN_CHECK(t.numel() == 0 || t.data != nullptr, "reference attention: ", name,
                 " has a null data pointer");
  std::span<const int64_t> shape(t.shape.data(), static_cast<size_t>(t.ndim));
  Tensor out = Tensor::empty(shape, DType::kFloat64);
  if (t.numel() == 0) return out;
  TensorView host_view = t;
  Tensor staged;
  if (!t.device.is_cpu()) {
    // Copy the whole byte span the strided view touches, then re-view it on the host.
    int64_t lo = 0, hi = 0;
    for (int d = 0; d < t.ndim; ++d) {
      const int64_t reach = (t.shape[d] - 1) * t.strides[d];
      if (reach < 0)
        lo += reach;
      else
        hi += reach;
    }
    const int64_t span_elems = hi - lo + 1;
    const int64_t es = static_cast<int64_t>(t.element_size());
    const int64_t span_shape[1] = {span_elems};
    staged = Tensor::empty(std::span<const int64_t>(span_shape, 1), t.dtype);
    device_copy(staged.data(), Device::cpu(), static_cast<const char*>(t.data) + lo * es, t.device,
                static_cast<size_t>(span_elems * es));
    host_view.data = static_cast<char*>(staged.data()) - lo * es;
    host_view.device = Device::cpu();
  }
  Tensor packed = to_device(host_view, Device::cpu());
  convert_dtype_cpu(packed.view(), out.view());
  return out;
}

struct Dims {
  int64_t B, Sq, Sk, Hq, Hkv, D, Dv;
};

Dims check_dims(const TensorView& q, const TensorView& k, const TensorView& v) {
  DISTATTN_CHECK(q.ndim == 4 && k.ndim == 4 && v.ndim == 4,
                 "reference attention: q, k, v must be 4-D BSHD, got q ", q.str(), ", k ", k.str(),
                 ", v ", v.str());
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  DISTATTN_CHECK(k.size(0) == d.B && v.size(0) == d.B, "reference attention: batch of k ",
                 k.shape_str(), " / v ", v.shape_str(), " must equal q's batch ", d.B);
  DISTATTN_CHECK(v.size(1) == d.Sk && v.size(2) == d.Hkv, "reference attention: v ", v.shape_str(),
                 " must have k's sequence length and KV heads ", k.shape_str());
  DISTATTN_CHECK(k.size(3) == d.D, "reference attention: k head_dim ", k.size(3),
                 " must equal q head_dim ", d.D);
  DISTATTN_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "reference attention: query heads ", d.Hq,
                 " must be a multiple of KV heads ", d.Hkv);
  return d;
}

// Document and document-relative position of every query row and key row.
struct Tokens {
  std::vector<int64_t> qdoc, qpos, kdoc, kpos;
};

Tokens tokens_of(const ops::AttentionOptions& o, int64_t Sq, int64_t Sk) {
  Tokens t;
  t.qdoc.assign(static_cast<size_t>(Sq), 0);
  t.kdoc.assign(static_cast<size_t>(Sk), 0);
  t.qpos.resize(static_cast<size_t>(Sq));
  t.kpos.resize(static_cast<size_t>(Sk));
  if (o.cu_seqlens.empty()) {
    for (int64_t i = 0; i < Sq; ++i) t.qpos[i] = o.q_offset + i;
    for (int64_t j = 0; j < Sk; ++j) t.kpos[j] = o.k_offset + j;
    return t;
  }
  const auto& cq = o.cu_seqlens;
  const auto& ck = o.cu_seqlens_k.empty() ? o.cu_seqlens : o.cu_seqlens_k;
  DISTATTN_CHECK(cq.size() == ck.size() && cq.back() == Sq && ck.back() == Sk,
                 "reference attention: cu_seqlens must end at seq_q and cu_seqlens_k at seq_k");
  for (size_t d = 0; d + 1 < cq.size(); ++d) {
    const int64_t lq = cq[d + 1] - cq[d], lk = ck[d + 1] - ck[d];
    for (int64_t i = 0; i < lq; ++i) {
      t.qdoc[cq[d] + i] = static_cast<int64_t>(d);
      t.qpos[cq[d] + i] = lk - lq + i;
    }
    for (int64_t j = 0; j < lk; ++j) {
      t.kdoc[ck[d] + j] = static_cast<int64_t>(d);
      t.kpos[ck[d] + j] = j;
    }
  }
  return t;
}

bool visible(const ops::AttentionOptions& o, const Tokens& t, int64_t i, int64_t j) {
  if (t.qdoc[i] != t.kdoc[j]) return false;
  const int64_t qpos = t.qpos[i], kpos = t.kpos[j];
  if (o.causal && kpos > qpos) return false;
  // Sink token (the window does not apply): positions below sink_tokens, as the kernels'
  // pieces split them; none at all when sink_tokens is 0 (also for negative positions).
  if (o.sink_tokens > 0 && kpos < o.sink_tokens) return true;
  if (o.window_left >= 0 && kpos < qpos - o.window_left) return false;
  if (o.window_right >= 0 && kpos > qpos + o.window_right) return false;
  return true;
}

// The learned sink logit of head h (-inf: none).
double sink_of(const ops::AttentionOptions& o, int64_t h) {
  if (o.sinks.data == nullptr) return -std::numeric_limits<double>::infinity();
  Tensor s = to_device(o.sinks, Device::cpu());
  return s.data_as<const float>()[h];
}

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Scores and probabilities of one (b, h, i) row. p[j] = exp(s_j - lse), 0 where masked.
// Returns lse (-inf when no key is visible).
// With a sink logit (> -inf) the denominator gains e^sink; a row with no visible key then
// has lse = sink and all p = 0.
double row_probs(const double* qrow, const double* kbase, int64_t k_tok_stride, int64_t Sk,
                 int64_t D, double scale, const ops::AttentionOptions& o, const Tokens& t,
                 int64_t qi, double sink, std::vector<double>& p) {
  double m = sink;
  for (int64_t j = 0; j < Sk; ++j) {
    if (!visible(o, t, qi, j)) {
      p[j] = kNegInf;
      continue;
    }
    const double* kr = kbase + j * k_tok_stride;
    double s = 0;
    for (int64_t e = 0; e < D; ++e) s += qrow[e] * kr[e];
    p[j] = s * scale;
    m = std::max(m, p[j]);
  }
  if (m == kNegInf) {
    std::fill(p.begin(), p.begin() + Sk, 0.0);
    return kNegInf;
  }
  double l = sink == kNegInf ? 0.0 : std::exp(sink - m);
  for (int64_t j = 0; j < Sk; ++j) l += p[j] == kNegInf ? 0.0 : std::exp(p[j] - m);
  const double lse = m + std::log(l);
  for (int64_t j = 0; j < Sk; ++j) p[j] = p[j] == kNegInf ? 0.0 : std::exp(p[j] - lse);
  return lse;
}

}  // namespace

ReferenceForward reference_attention_forward(const TensorView& q, const TensorView& k,
                                             const TensorView& v,
                                             const ops::AttentionOptions& opts) {
  const Dims d = check_dims(q, k, v);
  const double scale = opts.scale_for(d.D);
  Tensor qh = host_fp64(q, "q"), kh = host_fp64(k, "k"), vh = host_fp64(v, "v");
  ReferenceForward r;
  r.out = Tensor::zeros({d.B, d.Sq, d.Hq, d.Dv}, DType::kFloat64);
  r.lse = Tensor::empty({d.B, d.Hq, d.Sq}, DType::kFloat64);
  const double* Q = qh.data_as<double>();
  const double* K = kh.data_as<double>();
  const double* V = vh.data_as<double>();
  double* O = r.out.data_as<double>();
  double* L = r.lse.data_as<double>();
  const int64_t group = d.Hq / d.Hkv;
  std::vector<double> p(static_cast<size_t>(std::max<int64_t>(d.Sk, 1)));
  const Tokens tok = tokens_of(opts, d.Sq, d.Sk);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h) {
      const double sink = sink_of(opts, h);
      const int64_t hk = h / group;
      const double* kbase = K + (b * d.Sk * d.Hkv + hk) * d.D;
      const double* vbase = V + (b * d.Sk * d.Hkv + hk) * d.Dv;
      for (int64_t i = 0; i < d.Sq; ++i) {
        const double* qrow = Q + ((b * d.Sq + i) * d.Hq + h) * d.D;
        const double lse =
            row_probs(qrow, kbase, d.Hkv * d.D, d.Sk, d.D, scale, opts, tok, i, sink, p);
        L[(b * d.Hq + h) * d.Sq + i] = lse;
        double* orow = O + ((b * d.Sq + i) * d.Hq + h) * d.Dv;
        for (int64_t j = 0; j < d.Sk; ++j) {
          if (p[j] == 0.0) continue;
          const double* vr = vbase + j * d.Hkv * d.Dv;
          for (int64_t e = 0; e < d.Dv; ++e) orow[e] += p[j] * vr[e];
        }
      }
    }
  return r;
}

ReferenceBackward reference_attention_backward(const TensorView& q, const TensorView& k,
                                               const TensorView& v, const TensorView& dout,
                                               const ops::AttentionOptions& opts) {
  const Dims d = check_dims(q, k, v);
  DISTATTN_CHECK(dout.ndim == 4 && dout.size(0) == d.B && dout.size(1) == d.Sq &&
                     dout.size(2) == d.Hq && dout.size(3) == d.Dv,
                 "reference attention backward: dout ", dout.shape_str(), " must be [", d.B, ", ",
                 d.Sq, ", ", d.Hq, ", ", d.Dv, "] (out's shape)");
  const double scale = opts.scale_for(d.D);
  Tensor qh = host_fp64(q, "q"), kh = host_fp64(k, "k"), vh = host_fp64(v, "v");
  Tensor doh = host_fp64(dout, "dout");
  ReferenceBackward r;
  r.dq = Tensor::zeros({d.B, d.Sq, d.Hq, d.D}, DType::kFloat64);
  r.dk = Tensor::zeros({d.B, d.Sk, d.Hkv, d.D}, DType::kFloat64);
  r.dv = Tensor::zeros({d.B, d.Sk, d.Hkv, d.Dv}, DType::kFloat64);
  r.dsinks = Tensor::zeros({d.Hq}, DType::kFloat64);
  double* dS = r.dsinks.data_as<double>();
  const Tokens tok = tokens_of(opts, d.Sq, d.Sk);
  const double* Q = qh.data_as<double>();
  const double* K = kh.data_as<double>();
  const double* V = vh.data_as<double>();
  const double* dO = doh.data_as<double>();
  double* dQ = r.dq.data_as<double>();
  double* dK = r.dk.data_as<double>();
  double* dV = r.dv.data_as<double>();
  const int64_t group = d.Hq / d.Hkv;
  std::vector<double> p(static_cast<size_t>(std::max<int64_t>(d.Sk, 1)));
  std::vector<double> dp(p.size());
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h) {
      const double sink = sink_of(opts, h);
      const int64_t hk = h / group;
      const int64_t kv_row0 = b * d.Sk * d.Hkv + hk;  // token j at kv_row0 + j * Hkv
      for (int64_t i = 0; i < d.Sq; ++i) {
        const int64_t qrow_idx = (b * d.Sq + i) * d.Hq + h;
        const double* qrow = Q + qrow_idx * d.D;
        const double* dorow = dO + qrow_idx * d.Dv;
        const double lse = row_probs(qrow, K + kv_row0 * d.D, d.Hkv * d.D, d.Sk, d.D, scale, opts,
                                     tok, i, sink, p);
        if (lse == kNegInf) continue;  // fully masked row: no gradient flows
        // dP_ij = dout_i . v_j ; Delta_i = sum_j P_ij dP_ij ; dS_ij = P_ij (dP_ij - Delta_i)
        double delta = 0;
        for (int64_t j = 0; j < d.Sk; ++j) {
          dp[j] = 0;
          if (p[j] == 0.0) continue;
          const double* vr = V + (kv_row0 + j * d.Hkv) * d.Dv;
          double s = 0;
          for (int64_t e = 0; e < d.Dv; ++e) s += dorow[e] * vr[e];
          dp[j] = s;
          delta += p[j] * s;
        }
        // dL/dsink = -p_sink * Delta (the sink's value is 0, so its dP is 0).
        if (sink != kNegInf) dS[h] -= std::exp(sink - lse) * delta;
        double* dqrow = dQ + qrow_idx * d.D;
        for (int64_t j = 0; j < d.Sk; ++j) {
          if (p[j] == 0.0) continue;
          const double ds = p[j] * (dp[j] - delta) * scale;
          const int64_t kv = kv_row0 + j * d.Hkv;
          const double* kr = K + kv * d.D;
          double* dkr = dK + kv * d.D;
          double* dvr = dV + kv * d.Dv;
          for (int64_t e = 0; e < d.D; ++e) {
            dqrow[e] += ds * kr[e];
            dkr[e] += ds * qrow[e];
          }
          for (int64_t e = 0; e < d.Dv; ++e) dvr[e] += p[j] * dorow[e];
        }
      }
    }
  return r;
}

}  // namespace distattn::kernels::cpu
