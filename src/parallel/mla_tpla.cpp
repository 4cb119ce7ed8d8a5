// TPLA offline reparameterization (rotation U, logit scales mu), the Jacobi eigensolver
// for PCA, and the resharding of a prefill cache into TPLA and decode-CP shards.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "distattn/core/random.h"
#include "distattn/ops/mla.h"
#include "distattn/parallel/mla.h"
#include "src/parallel/mla_internal.h"

namespace distattn::parallel {

const char* sharding_name(MlaSharding s) {
  switch (s) {
    case MlaSharding::kMlaTp:
      return "mla-tp";
    case MlaSharding::kTpla:
      return "tpla";
    case MlaSharding::kDecodeCp:
      return "decode-cp";
  }
  return "?";
}
const char* rotation_name(TplaRotation r) {
  switch (r) {
    case TplaRotation::kNone:
      return "none";
    case TplaRotation::kHadamard:
      return "hadamard";
    case TplaRotation::kPca:
      return "pca";
  }
  return "?";
}
const char* norm_name(TplaNorm n) {
  return n == TplaNorm::kSliced ? "sliced" : "exact";
}

MlaSharding parse_sharding(const std::string& s) {
  if (s == "mla-tp") return MlaSharding::kMlaTp;
  if (s == "tpla") return MlaSharding::kTpla;
  if (s == "decode-cp") return MlaSharding::kDecodeCp;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown MLA sharding '", s,
                 "' (use mla-tp, tpla or decode-cp)");
}
TplaRotation parse_rotation(const std::string& s) {
  if (s == "none") return TplaRotation::kNone;
  if (s == "hadamard") return TplaRotation::kHadamard;
  if (s == "pca") return TplaRotation::kPca;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown TPLA rotation '", s,
                 "' (use none, hadamard or pca)");
}
TplaNorm parse_norm(const std::string& s) {
  if (s == "sliced") return TplaNorm::kSliced;
  if (s == "exact") return TplaNorm::kExact;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown TPLA RMSNorm mode '", s,
                 "' (use sliced or exact)");
}

// ---- eigensolver -------------------------------------------------------------------------

std::vector<double> symmetric_eigen(std::vector<double>& a, int64_t n, std::vector<double>& vec) {
  DISTATTN_CHECK(n > 0 && static_cast<int64_t>(a.size()) == n * n,
                 "symmetric_eigen: a must hold n*n = ", n * n, " values, got ", a.size());
  vec.assign(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) vec[static_cast<size_t>(i * n + i)] = 1.0;
  auto A = [&](int64_t i, int64_t j) -> double& { return a[static_cast<size_t>(i * n + j)]; };
  double total = 0;
  for (double v : a) total += v * v;
  const double tol = 1e-24 * std::max(total, 1e-300);
  bool converged = false;
  // Cyclic Jacobi: each rotation zeroes a(p,q); the off-diagonal mass falls quadratically
  // once small. ~10 sweeps for 512x512.
  for (int sweep = 0; sweep < 100 && !converged; ++sweep) {
    double off = 0;
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) off += 2 * A(p, q) * A(p, q);
    if (off <= tol) {
      converged = true;
      break;
    }
    for (int64_t p = 0; p < n - 1; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = A(p, q);
        if (std::abs(apq) < 1e-300) continue;
        const double theta = (A(q, q) - A(p, p)) / (2 * apq);
        const double t =
            (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int64_t k = 0; k < n; ++k) {  // columns p, q
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {  // rows p, q
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        for (int64_t k = 0; k < n; ++k) {
          double* vk = vec.data() + k * n;
          const double vp = vk[p], vq = vk[q];
          vk[p] = c * vp - s * vq;
          vk[q] = s * vp + c * vq;
        }
      }
  }
  DISTATTN_CHECK_STATUS(converged, Status::kInternal,
                        "symmetric_eigen: Jacobi did not converge in 100 sweeps (is the matrix "
                        "symmetric and finite?)");
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t i, int64_t j) { return A(i, i) > A(j, j); });
  std::vector<double> vals(static_cast<size_t>(n)), sorted(static_cast<size_t>(n * n));
  for (int64_t k = 0; k < n; ++k) {
    vals[static_cast<size_t>(k)] = A(order[static_cast<size_t>(k)], order[static_cast<size_t>(k)]);
    for (int64_t i = 0; i < n; ++i)
      sorted[static_cast<size_t>(i * n + k)] =
          vec[static_cast<size_t>(i * n + order[static_cast<size_t>(k)])];
  }
  vec.swap(sorted);
  return vals;
}

// ---- reparameterization ------------------------------------------------------------------

void TplaReparam::rotate_rows(float* rows, int64_t n) const {
  if (rotation == TplaRotation::kNone) return;
  if (rotation == TplaRotation::kHadamard) {
    // c U = (c D) H / sqrt(d): signs, then the fast transform.
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < latent; ++j) rows[i * latent + j] *= signs[static_cast<size_t>(j)];
    TensorView v(rows, DType::kFloat32, Device::cpu(), {n, latent});
    ops::hadamard_transform(v, 1.0f / std::sqrt(static_cast<float>(latent)));
    return;
  }
  std::vector<float> uf(u.begin(), u.end());
  std::vector<float> out(static_cast<size_t>(n * latent));
  mla_detail::gemm(n, latent, latent, rows, latent, uf.data(), latent, out.data(), latent);
  std::copy(out.begin(), out.end(), rows);
}

TplaReparam make_tpla_reparam(int64_t latent, int groups, TplaRotation rotation, uint64_t seed,
                              const float* calib_latents, int64_t n_latents,
                              const float* calib_qlat, int64_t n_queries) {
  DISTATTN_CHECK(latent > 0 && groups >= 1 && latent % groups == 0, "make_tpla_reparam: groups (",
                 groups, ") must divide the latent width (", latent, ")");
  TplaReparam rp;
  rp.latent = latent;
  rp.groups = groups;
  rp.rotation = rotation;
  const int64_t d = latent;
  rp.u.assign(static_cast<size_t>(d * d), 0.0);
  if (rotation == TplaRotation::kNone) {
    for (int64_t i = 0; i < d; ++i) rp.u[static_cast<size_t>(i * d + i)] = 1.0;
  } else if (rotation == TplaRotation::kHadamard) {
    DISTATTN_CHECK((d & (d - 1)) == 0,
                   "make_tpla_reparam: the Hadamard rotation needs a "
                   "power-of-two latent width, got ",
                   d, " (use pca)");
    rp.signs.resize(static_cast<size_t>(d));
    for (int64_t i = 0; i < d; ++i)
      rp.signs[static_cast<size_t>(i)] =
          hash_uniform(seed, 0x4144u, static_cast<uint64_t>(i)) < 0 ? -1.0f : 1.0f;
    const double s = 1.0 / std::sqrt(static_cast<double>(d));
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) {
        const double h = (__builtin_popcountll(static_cast<uint64_t>(i & j)) & 1) ? -1.0 : 1.0;
        rp.u[static_cast<size_t>(i * d + j)] = rp.signs[static_cast<size_t>(i)] * h * s;
      }
  } else {
    DISTATTN_CHECK(calib_latents != nullptr && n_latents >= 2,
                   "make_tpla_reparam: pca needs calibration latents (n >= 2), got ", n_latents);
    // Second moment E[c c^T] (not mean-centred: the logits see the mean too).
    std::vector<double> m(static_cast<size_t>(d * d), 0.0);
    for (int64_t t = 0; t < n_latents; ++t) {
      const float* c = calib_latents + t * d;
      for (int64_t i = 0; i < d; ++i) {
        const double ci = c[i];
        double* mi = m.data() + i * d;
        for (int64_t j = i; j < d; ++j) mi[j] += ci * c[j];
      }
    }
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = i; j < d; ++j) {
        const double v = m[static_cast<size_t>(i * d + j)] / static_cast<double>(n_latents);
        m[static_cast<size_t>(i * d + j)] = v;
        m[static_cast<size_t>(j * d + i)] = v;
      }
    rp.eigenvalues = symmetric_eigen(m, d, rp.u);  // columns = eigenvectors, descending
  }
  calibrate_tpla_mu(rp, calib_latents, n_latents, calib_qlat, n_queries);
  return rp;
}

void calibrate_tpla_mu(TplaReparam& rp, const float* calib_latents, int64_t n_latents,
                       const float* calib_qlat, int64_t n_queries) {
  const int64_t d = rp.latent;
  const int groups = rp.groups;
  DISTATTN_CHECK(
      d > 0 && groups >= 1 && d % groups == 0 && static_cast<int64_t>(rp.u.size()) == d * d,
      "calibrate_tpla_mu: pass a TplaReparam from make_tpla_reparam whose groups (", groups,
      ") divide its latent width (", d, ")");
  DISTATTN_CHECK(n_latents >= 0 && n_queries >= 0,
                 "calibrate_tpla_mu: calibration counts must be >= 0");
  rp.mu.assign(static_cast<size_t>(groups), 1.0f);
  if (calib_qlat != nullptr && n_queries > 0 && calib_latents != nullptr && n_latents > 0 &&
      groups > 1) {
    // Least-squares fit per shard: mu_i = sum(a_i a) / sum(a_i^2) over all (query, key)
    // pairs. With Q = sum_q q_hat q_hat^T and C = sum_t c_hat c_hat^T (rotated space),
    // sum_{q,t} a_i a_j = sum_{k in slice i, l in slice j} Q[k,l] C[k,l], so the fit costs
    // (n_queries + n_latents) d^2 / 2 instead of n_queries n_latents d: every calibration
    // query meets every calibration latent at the cost of two second-moment matrices.
    std::vector<float> qh(calib_qlat, calib_qlat + n_queries * d);
    std::vector<float> ch(calib_latents, calib_latents + n_latents * d);
    rp.rotate_rows(qh.data(), n_queries);  // q . c = (q U) . (c U) for orthogonal U
    rp.rotate_rows(ch.data(), n_latents);
    auto second_moment = [d](const std::vector<float>& rows, int64_t n) {
      std::vector<double> m(static_cast<size_t>(d * d), 0.0);
      for (int64_t t = 0; t < n; ++t) {
        const float* r = rows.data() + t * d;
        for (int64_t k = 0; k < d; ++k) {
          const double rk = r[k];
          double* mk = m.data() + k * d;
          for (int64_t l = k; l < d; ++l) mk[l] += rk * r[l];
        }
      }
      for (int64_t k = 0; k < d; ++k)
        for (int64_t l = 0; l < k; ++l)
          m[static_cast<size_t>(k * d + l)] = m[static_cast<size_t>(l * d + k)];
      return m;
    };
    const std::vector<double> qm = second_moment(qh, n_queries), cm = second_moment(ch, n_latents);
    const int64_t w = d / groups;
    std::vector<double> num(static_cast<size_t>(groups), 0.0),
        den(static_cast<size_t>(groups), 0.0);
    for (int64_t k = 0; k < d; ++k) {
      const int gk = static_cast<int>(k / w);
      for (int64_t l = 0; l < d; ++l) {
        const double v = qm[static_cast<size_t>(k * d + l)] * cm[static_cast<size_t>(k * d + l)];
        num[static_cast<size_t>(gk)] += v;  // pairs (slice gk, any slice)
        if (l / w == gk) den[static_cast<size_t>(gk)] += v;
      }
    }
    for (int g = 0; g < groups; ++g)
      if (den[static_cast<size_t>(g)] > 0)
        rp.mu[static_cast<size_t>(g)] =
            static_cast<float>(num[static_cast<size_t>(g)] / den[static_cast<size_t>(g)]);
  }
}

void tpla_normalize_slice(float* slice, int64_t w, TplaNorm norm, double full_sum_sq,
                          int64_t latent, float eps) {
  DISTATTN_CHECK(slice != nullptr && w > 0 && latent >= w && eps > 0,
                 "tpla_normalize_slice: need a slice of width w > 0 within the latent (w ", w,
                 ", latent ", latent, ") and eps > 0");
  double ss = full_sum_sq, count = static_cast<double>(latent);
  if (norm == TplaNorm::kSliced) {
    ss = 0;
    for (int64_t j = 0; j < w; ++j) ss += static_cast<double>(slice[j]) * slice[j];
    count = static_cast<double>(w);
  }
  DISTATTN_CHECK(std::isfinite(ss) && ss >= 0,
                 "tpla_normalize_slice: the sum of squares must be finite and >= 0, got ", ss);
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / count + eps));
  for (int64_t j = 0; j < w; ++j) slice[j] *= inv;
}

void tpla_shard_attention(const TplaReparam& rp, int group, const TensorView& q_lat,
                          const TensorView& q_pe, const ops::MlaPagedCache& shard,
                          const TensorView& out, const TensorView& lse,
                          ops::MlaDecodeOptions opts) {
  DISTATTN_CHECK(group >= 0 && group < rp.groups && static_cast<int64_t>(rp.mu.size()) == rp.groups,
                 "tpla_shard_attention: group ", group, " outside [0, ", rp.groups,
                 ") or the reparameterization has no mu per group");
  DISTATTN_CHECK(q_lat.ndim == 3 && q_lat.size(2) == rp.slice_width(),
                 "tpla_shard_attention: q_lat must be [B, H, latent/g = ", rp.slice_width(),
                 "], got ", q_lat.str());
  opts.latent_logit_scale = rp.mu[static_cast<size_t>(group)];
  ops::mla_decode(q_lat, q_pe, shard, out, lse, opts);
}

// ---- resharding --------------------------------------------------------------------------

MlaCache reshard_to_tpla(const MlaCache& full, const TplaReparam& rp, int group, int64_t capacity) {
  DISTATTN_CHECK(rp.latent == full.latent_dim(),
                 "reshard_to_tpla: the reparameterization is for "
                 "latent width ",
                 rp.latent, " but the cache has ", full.latent_dim());
  DISTATTN_CHECK(group >= 0 && group < rp.groups, "reshard_to_tpla: group ", group, " outside [0, ",
                 rp.groups, ")");
  DISTATTN_CHECK(capacity >= full.length(), "reshard_to_tpla: capacity ", capacity,
                 " is smaller than the cache length ", full.length());
  const int64_t dl = full.latent_dim(), dr = full.rope_dim(), w = rp.slice_width();
  MlaCache out(capacity, full.page_size(), w, dr, full.dtype());
  constexpr int64_t kChunk = 256;
  std::vector<float> rows(static_cast<size_t>(kChunk * (dl + dr)));
  std::vector<float> lat(static_cast<size_t>(kChunk * dl)), sl(static_cast<size_t>(kChunk * w));
  std::vector<float> pe(static_cast<size_t>(kChunk * std::max<int64_t>(dr, 1)));
  for (int64_t t0 = 0; t0 < full.length(); t0 += kChunk) {
    const int64_t n = std::min(kChunk, full.length() - t0);
    for (int64_t i = 0; i < n; ++i) {
      float* r = rows.data() + i * (dl + dr);
      full.read_row(t0 + i, r);
      std::copy(r, r + dl, lat.data() + i * dl);
      std::copy(r + dl, r + dl + dr, pe.data() + i * dr);
    }
    rp.rotate_rows(lat.data(), n);
    for (int64_t i = 0; i < n; ++i)
      std::copy(lat.data() + i * dl + group * w, lat.data() + i * dl + (group + 1) * w,
                sl.data() + i * w);
    out.append(sl.data(), pe.data(), n);
  }
  return out;
}

int64_t decode_cp_local_pages(int64_t capacity, int64_t page_size, int rank, int ranks) {
  const int64_t total = (capacity + page_size - 1) / page_size;
  return total > rank ? (total - rank + ranks - 1) / ranks : 0;
}

MlaCache reshard_to_decode_cp(const MlaCache& full, int rank, int ranks, int64_t capacity) {
  DISTATTN_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "reshard_to_decode_cp: rank ", rank,
                 " outside [0, ", ranks, ")");
  DISTATTN_CHECK(capacity >= full.length(), "reshard_to_decode_cp: capacity ", capacity,
                 " is smaller than the cache length ", full.length());
  const int64_t ps = full.page_size(), dl = full.latent_dim(), dr = full.rope_dim();
  MlaCache out(decode_cp_local_pages(capacity, ps, rank, ranks) * ps, ps, dl, dr, full.dtype());
  std::vector<float> row(static_cast<size_t>(dl + dr));
  for (int64_t p = rank; p * ps < full.length(); p += ranks)
    for (int64_t t = p * ps; t < std::min((p + 1) * ps, full.length()); ++t) {
      full.read_row(t, row.data());
      out.append(row.data(), row.data() + dl, 1);
    }
  return out;
}

}  // namespace distattn::parallel
