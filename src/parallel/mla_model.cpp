// MLA model pieces: config, weights, paged latent cache, exact prefill under head-parallel
// TP, the fp64 reference, and the dense helpers.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "distattn/core/half.h"
#include "distattn/core/npy.h"
#include "distattn/core/random.h"
#include "distattn/ops/attention.h"
#include "distattn/ops/dense.h"
#include "distattn/parallel/mla.h"
#include "src/parallel/mla_internal.h"

namespace distattn::parallel {

namespace mla_detail {

void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
  const int64_t as[] = {lda, 1}, bs[] = {ldb, 1}, cs[] = {ldc, 1};
  const int64_t ash[] = {m, k}, bsh[] = {k, n}, csh[] = {m, n};
  ops::matmul(TensorView(const_cast<float*>(a), DType::kFloat32, Device::cpu(), ash, as),
              TensorView(const_cast<float*>(b), DType::kFloat32, Device::cpu(), bsh, bs),
              TensorView(c, DType::kFloat32, Device::cpu(), csh, cs), {.accumulate = accumulate});
}

void gemm_bt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t as[] = {lda, 1}, bs[] = {ldb, 1}, cs[] = {ldc, 1};
  const int64_t ash[] = {m, k}, bsh[] = {n, k}, csh[] = {m, n};
  ops::matmul(TensorView(const_cast<float*>(a), DType::kFloat32, Device::cpu(), ash, as),
              TensorView(const_cast<float*>(b), DType::kFloat32, Device::cpu(), bsh, bs),
              TensorView(c, DType::kFloat32, Device::cpu(), csh, cs),
              {.accumulate = accumulate, .transpose_b = true});
}

void rms_normalize_rows(float* x, int64_t n, int64_t d, int64_t ld, float eps) {
  for (int64_t i = 0; i < n; ++i) {
    float* r = x + i * ld;
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(r[j]) * r[j];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    for (int64_t j = 0; j < d; ++j) r[j] *= inv;
  }
}

template <typename T>
void rope_impl(T* v, int64_t d, int64_t pos, double theta) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    const double ang = static_cast<double>(pos) * freq;
    const double cs = std::cos(ang), sn = std::sin(ang);
    const double a = v[i], b = v[i + half];
    v[i] = static_cast<T>(a * cs - b * sn);
    v[i + half] = static_cast<T>(a * sn + b * cs);
  }
}
void rope_inplace(float* v, int64_t d, int64_t pos, double theta) {
  rope_impl(v, d, pos, theta);
}
void rope_inplace(double* v, int64_t d, int64_t pos, double theta) {
  rope_impl(v, d, pos, theta);
}

}  // namespace mla_detail

using namespace mla_detail;

// ---- config ------------------------------------------------------------------------------

float MlaConfig::scale() const {
  return softmax_scale > 0 ? softmax_scale
                           : 1.0f / std::sqrt(static_cast<float>(qk_nope + qk_rope));
}

void MlaConfig::validate() const {
  DISTATTN_CHECK(hidden > 0 && heads > 0 && kv_lora_rank > 0 && qk_nope > 0 && v_head > 0,
                 "MlaConfig: hidden, heads, kv_lora_rank, qk_nope and v_head must be > 0 (", str(),
                 ")");
  DISTATTN_CHECK(q_lora_rank >= 0,
                 "MlaConfig: q_lora_rank must be >= 0 (0 = no query "
                 "compression), got ",
                 q_lora_rank);
  DISTATTN_CHECK(qk_rope >= 0 && qk_rope % 2 == 0,
                 "MlaConfig: qk_rope must be even and >= 0 (RoPE rotates pairs), got ", qk_rope);
  DISTATTN_CHECK(page_size > 0, "MlaConfig: page_size must be > 0, got ", page_size);
  DISTATTN_CHECK(softmax_scale >= 0 && rms_eps > 0 && rope_theta > 0,
                 "MlaConfig: softmax_scale >= 0 (0 = default), rms_eps > 0, rope_theta > 0");
}

std::string MlaConfig::str() const {
  std::ostringstream os;
  os << "hidden=" << hidden << " heads=" << heads << " q_lora=" << q_lora_rank
     << " kv_lora=" << kv_lora_rank << " qk_nope=" << qk_nope << " qk_rope=" << qk_rope
     << " v_head=" << v_head << " page=" << page_size << " scale=" << scale();
  return os.str();
}

// ---- weights -----------------------------------------------------------------------------

namespace {
enum : uint64_t { kWdq = 1, kWuq, kWqr, kWdkv, kWkr, kGamma, kWuk, kWuv, kWo };
}  // namespace

MlaWeights MlaWeights::generate(const MlaConfig& cfg, uint64_t seed, int64_t head_begin,
                                int64_t head_count) {
  cfg.validate();
  if (head_count < 0) head_count = cfg.heads - head_begin;
  DISTATTN_CHECK(head_begin >= 0 && head_count >= 0 && head_begin + head_count <= cfg.heads,
                 "MlaWeights::generate: heads [", head_begin, ", ", head_begin + head_count,
                 ") outside [0, ", cfg.heads, ")");
  MlaWeights w;
  w.head_begin = head_begin;
  w.head_count = head_count;
  const int64_t h = cfg.heads, q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : cfg.hidden;
  auto bound = [](int64_t fan_in) { return std::sqrt(3.0 / static_cast<double>(fan_in)); };
  if (cfg.q_lora_rank > 0)
    w.w_dq = uniform_matrix_block(seed, kWdq, cfg.hidden, cfg.q_lora_rank, cfg.q_lora_rank, 0, 0,
                                  bound(cfg.hidden));
  w.w_uq = uniform_matrix_block(seed, kWuq, q_in, head_count * cfg.qk_nope, h * cfg.qk_nope, 0,
                                head_begin * cfg.qk_nope, bound(q_in));
  w.w_qr = uniform_matrix_block(seed, kWqr, q_in, head_count * cfg.qk_rope, h * cfg.qk_rope, 0,
                                head_begin * cfg.qk_rope, bound(q_in));
  w.w_dkv = uniform_matrix_block(seed, kWdkv, cfg.hidden, cfg.kv_lora_rank, cfg.kv_lora_rank, 0, 0,
                                 bound(cfg.hidden));
  w.w_kr = uniform_matrix_block(seed, kWkr, cfg.hidden, cfg.qk_rope, cfg.qk_rope, 0, 0,
                                bound(cfg.hidden));
  w.gamma = Tensor::empty({cfg.kv_lora_rank}, DType::kFloat32);
  for (int64_t i = 0; i < cfg.kv_lora_rank; ++i)
    w.gamma.data_as<float>()[i] =
        static_cast<float>(1.0 + 0.5 * hash_uniform(seed, kGamma, static_cast<uint64_t>(i)));
  // w_uk [H, nope, kv] and w_uv [H, v_head, kv]: head slices are contiguous row ranges.
  Tensor uk =
      uniform_matrix_block(seed, kWuk, head_count * cfg.qk_nope, cfg.kv_lora_rank, cfg.kv_lora_rank,
                           head_begin * cfg.qk_nope, 0, bound(cfg.kv_lora_rank));
  w.w_uk = Tensor::empty({head_count, cfg.qk_nope, cfg.kv_lora_rank}, DType::kFloat32);
  std::memcpy(w.w_uk.data(), uk.data(), uk.nbytes());
  Tensor uv =
      uniform_matrix_block(seed, kWuv, head_count * cfg.v_head, cfg.kv_lora_rank, cfg.kv_lora_rank,
                           head_begin * cfg.v_head, 0, bound(cfg.kv_lora_rank));
  w.w_uv = Tensor::empty({head_count, cfg.v_head, cfg.kv_lora_rank}, DType::kFloat32);
  std::memcpy(w.w_uv.data(), uv.data(), uv.nbytes());
  w.w_o = uniform_matrix_block(seed, kWo, head_count * cfg.v_head, cfg.hidden, cfg.hidden,
                               head_begin * cfg.v_head, 0, bound(h * cfg.v_head));
  return w;
}

namespace {
// Columns [col0, col0 + cols) of a packed [rows, ld] fp32 tensor.
Tensor take_cols(const Tensor& t, int64_t col0, int64_t cols) {
  const int64_t rows = t.view().size(0), ld = t.view().size(1);
  Tensor out = Tensor::empty({rows, cols}, DType::kFloat32);
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(out.data_as<float>() + i * cols, t.data_as<float>() + i * ld + col0,
                static_cast<size_t>(cols) * 4);
  return out;
}
// Leading-dim range [row0, row0 + n) of a packed tensor (same trailing dims).
Tensor take_rows(const Tensor& t, int64_t row0, int64_t n) {
  std::vector<int64_t> shape(t.view().shape.begin(), t.view().shape.begin() + t.view().ndim);
  const int64_t row_elems = t.numel() / shape[0];
  shape[0] = n;
  Tensor out = Tensor::empty(shape, DType::kFloat32);
  std::memcpy(out.data(), t.data_as<float>() + row0 * row_elems,
              static_cast<size_t>(n * row_elems) * 4);
  return out;
}
}  // namespace

MlaWeights MlaWeights::load_npy(const MlaConfig& cfg, const std::string& dir, int64_t head_begin,
                                int64_t head_count) {
  cfg.validate();
  if (head_count < 0) head_count = cfg.heads - head_begin;
  DISTATTN_CHECK(head_begin >= 0 && head_count >= 0 && head_begin + head_count <= cfg.heads,
                 "MlaWeights::load_npy: heads [", head_begin, ", ", head_begin + head_count,
                 ") outside [0, ", cfg.heads, ")");
  auto rd = [&](const char* name, int rank) {
    NpyReadOptions o;
    o.dtype = DType::kFloat32;
    o.rank = rank;
    return read_npy(dir + "/" + name, o);
  };
  MlaWeights full;
  full.head_begin = 0;
  full.head_count = cfg.heads;
  if (cfg.q_lora_rank > 0) full.w_dq = rd("w_dq.npy", 2);
  full.w_uq = rd("w_uq.npy", 2);
  full.w_qr = rd("w_qr.npy", 2);
  full.w_dkv = rd("w_dkv.npy", 2);
  full.w_kr = rd("w_kr.npy", 2);
  full.gamma = rd("gamma.npy", 1);
  full.w_uk = rd("w_uk.npy", 3);
  full.w_uv = rd("w_uv.npy", 3);
  full.w_o = rd("w_o.npy", 2);
  full.check(cfg, 0, cfg.heads);  // shapes against the config, naming the tensor
  if (head_begin == 0 && head_count == cfg.heads) return full;
  MlaWeights w = full;
  w.head_begin = head_begin;
  w.head_count = head_count;
  w.w_uq = take_cols(full.w_uq, head_begin * cfg.qk_nope, head_count * cfg.qk_nope);
  w.w_qr = take_cols(full.w_qr, head_begin * cfg.qk_rope, head_count * cfg.qk_rope);
  w.w_uk = take_rows(full.w_uk, head_begin, head_count);
  w.w_uv = take_rows(full.w_uv, head_begin, head_count);
  w.w_o = take_rows(full.w_o, head_begin * cfg.v_head, head_count * cfg.v_head);
  return w;
}

void MlaWeights::save_npy(const MlaConfig& cfg, const std::string& dir) const {
  check(cfg, 0, cfg.heads);
  DISTATTN_CHECK(head_begin == 0 && head_count == cfg.heads,
                 "MlaWeights::save_npy: these weights hold heads [", head_begin, ", ",
                 head_begin + head_count, "); save needs all ", cfg.heads, " heads");
  if (cfg.q_lora_rank > 0) write_npy(dir + "/w_dq.npy", w_dq);
  write_npy(dir + "/w_uq.npy", w_uq);
  write_npy(dir + "/w_qr.npy", w_qr);
  write_npy(dir + "/w_dkv.npy", w_dkv);
  write_npy(dir + "/w_kr.npy", w_kr);
  write_npy(dir + "/gamma.npy", gamma);
  write_npy(dir + "/w_uk.npy", w_uk);
  write_npy(dir + "/w_uv.npy", w_uv);
  write_npy(dir + "/w_o.npy", w_o);
}

void MlaWeights::check(const MlaConfig& cfg, int64_t need_begin, int64_t need_count) const {
  DISTATTN_CHECK(need_begin >= head_begin && need_begin + need_count <= head_begin + head_count,
                 "MLA weights hold heads [", head_begin, ", ", head_begin + head_count,
                 ") but this rank needs [", need_begin, ", ", need_begin + need_count,
                 "): generate or load the weights for those heads (or all heads)");
  const int64_t q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : cfg.hidden;
  auto shape_is = [](const Tensor& t, std::initializer_list<int64_t> s) {
    if (!t.defined() || t.view().ndim != static_cast<int>(s.size()) || t.dtype() != DType::kFloat32)
      return false;
    int i = 0;
    for (int64_t d : s)
      if (t.view().size(i++) != d) return false;
    return true;
  };
  const int64_t n = head_count;
  DISTATTN_CHECK(cfg.q_lora_rank == 0 || shape_is(w_dq, {cfg.hidden, cfg.q_lora_rank}),
                 "MLA weights: w_dq must be fp32 [hidden, q_lora_rank]");
  DISTATTN_CHECK(shape_is(w_uq, {q_in, n * cfg.qk_nope}) && shape_is(w_qr, {q_in, n * cfg.qk_rope}),
                 "MLA weights: w_uq/w_qr must be fp32 [q_in, heads*qk_nope] / [q_in, "
                 "heads*qk_rope] for the held heads");
  DISTATTN_CHECK(shape_is(w_dkv, {cfg.hidden, cfg.kv_lora_rank}) &&
                     shape_is(w_kr, {cfg.hidden, cfg.qk_rope}) &&
                     shape_is(gamma, {cfg.kv_lora_rank}),
                 "MLA weights: w_dkv [hidden, kv_lora], w_kr [hidden, qk_rope], gamma [kv_lora]");
  DISTATTN_CHECK(shape_is(w_uk, {n, cfg.qk_nope, cfg.kv_lora_rank}) &&
                     shape_is(w_uv, {n, cfg.v_head, cfg.kv_lora_rank}) &&
                     shape_is(w_o, {n * cfg.v_head, cfg.hidden}),
                 "MLA weights: w_uk [heads, qk_nope, kv_lora], w_uv [heads, v_head, kv_lora], "
                 "w_o [heads*v_head, hidden] for the held heads");
}

// ---- cache -------------------------------------------------------------------------------

MlaCache::MlaCache(int64_t capacity, int64_t page_size, int64_t latent_dim, int64_t rope_dim,
                   DType dtype)
    : capacity_(capacity),
      page_size_(page_size),
      latent_dim_(latent_dim),
      rope_dim_(rope_dim),
      dtype_(dtype) {
  DISTATTN_CHECK(capacity >= 0 && page_size > 0 && latent_dim > 0 && rope_dim >= 0,
                 "MlaCache: capacity >= 0, page_size > 0, latent_dim > 0, rope_dim >= 0; got ",
                 capacity, ", ", page_size, ", ", latent_dim, ", ", rope_dim);
  DISTATTN_CHECK(dtype == DType::kFloat32 || dtype == DType::kBFloat16,
                 "MlaCache: dtype must be fp32 or bf16, got ", dtype_name(dtype));
  num_pages_ = (capacity + page_size - 1) / page_size;
  pages_ = Tensor::zeros({num_pages_, page_size, latent_dim + rope_dim}, dtype);
  page_table_ = Tensor::empty({1, std::max<int64_t>(num_pages_, 1)}, DType::kInt32);
  for (int64_t i = 0; i < page_table_.numel(); ++i)
    page_table_.data_as<int32_t>()[i] = static_cast<int32_t>(std::min(i, num_pages_ - 1));
  seq_lens_ = Tensor::zeros({1}, DType::kInt32);
}

int64_t MlaCache::kv_memory_bytes() const {
  return num_pages_ * page_size_ * (latent_dim_ + rope_dim_) *
         static_cast<int64_t>(dtype_size(dtype_));
}

int64_t MlaCache::kv_bytes_read() const {
  return length_ * (latent_dim_ + rope_dim_) * static_cast<int64_t>(dtype_size(dtype_));
}

void MlaCache::append(const float* latent, const float* rope, int64_t n) {
  DISTATTN_CHECK(length_ + n <= capacity_, "MlaCache::append: ", length_, " + ", n,
                 " tokens exceed the capacity ", capacity_,
                 " (allocate the cache for the full prompt + decode length)");
  const int64_t w = latent_dim_ + rope_dim_;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = length_ + i;
    const int64_t off = ((t / page_size_) * page_size_ + t % page_size_) * w;
    const float* lr = latent + i * latent_dim_;
    const float* rr = rope ? rope + i * rope_dim_ : nullptr;
    if (dtype_ == DType::kFloat32) {
      float* dst = pages_.data_as<float>() + off;
      std::memcpy(dst, lr, static_cast<size_t>(latent_dim_) * 4);
      if (rope_dim_ > 0) std::memcpy(dst + latent_dim_, rr, static_cast<size_t>(rope_dim_) * 4);
    } else {
      uint16_t* dst = pages_.data_as<uint16_t>() + off;
      for (int64_t d = 0; d < latent_dim_; ++d) dst[d] = bf16_t::from_float(lr[d]);
      for (int64_t d = 0; d < rope_dim_; ++d) dst[latent_dim_ + d] = bf16_t::from_float(rr[d]);
    }
  }
  length_ += n;
  seq_lens_.data_as<int32_t>()[0] = static_cast<int32_t>(length_);
}

void MlaCache::read_row(int64_t t, float* row) const {
  DISTATTN_CHECK(t >= 0 && t < length_, "MlaCache::read_row: token ", t, " outside [0, ", length_,
                 ")");
  const int64_t w = latent_dim_ + rope_dim_;
  const int64_t off = t * w;  // page i holds tokens [i*ps, (i+1)*ps): identity table
  if (dtype_ == DType::kFloat32) {
    std::memcpy(row, pages_.data_as<float>() + off, static_cast<size_t>(w) * 4);
  } else {
    const uint16_t* src = pages_.data_as<uint16_t>() + off;
    for (int64_t d = 0; d < w; ++d) row[d] = bf16_t::to_float(src[d]);
  }
}

ops::MlaPagedCache MlaCache::view() const {
  ops::MlaPagedCache v;
  v.pages = pages_.view();
  v.page_table = page_table_.view();
  v.seq_lens = seq_lens_.view();
  v.latent_dim = latent_dim_;
  return v;
}

// ---- prefill -----------------------------------------------------------------------------

MlaPrefillResult mla_prefill_tp(const MlaConfig& cfg, const MlaWeights& weights,
                                const TensorView& x, comm::Communicator& tp, int64_t capacity,
                                DType cache_dtype) {
  cfg.validate();
  const int p = tp.size(), r = tp.rank();
  DISTATTN_CHECK(cfg.heads % p == 0, "mla_prefill_tp: heads (", cfg.heads,
                 ") must be divisible by the TP size (", p, "): use a TP size dividing heads");
  DISTATTN_CHECK(x.ndim == 2 && x.size(1) == cfg.hidden && x.dtype == DType::kFloat32 &&
                     x.is_contiguous() && x.device.is_cpu(),
                 "mla_prefill_tp: x must be a packed fp32 CPU tensor [S, hidden=", cfg.hidden,
                 "], got ", x.str());
  const int64_t s = x.size(0);
  DISTATTN_CHECK(capacity >= s, "mla_prefill_tp: capacity (", capacity, ") must hold the prompt (",
                 s, " tokens)");
  const int64_t hl = cfg.heads / p, h0 = r * hl;
  weights.check(cfg, h0, hl);
  const int64_t lo = h0 - weights.head_begin;  // local head offset inside the weights
  const int64_t nope = cfg.qk_nope, rope = cfg.qk_rope, dqk = nope + rope, dv = cfg.v_head;
  const int64_t dl = cfg.kv_lora_rank, hid = cfg.hidden;
  const int64_t q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : hid;
  const int64_t wn = weights.head_count;
  const float* xp = x.data_as<const float>();

  // Query path.
  Tensor cq_t;
  const float* cq = xp;
  if (cfg.q_lora_rank > 0) {
    cq_t = Tensor::empty({s, q_in}, DType::kFloat32);
    gemm(s, q_in, hid, xp, hid, weights.w_dq.data_as<float>(), q_in, cq_t.data_as<float>(), q_in);
    rms_normalize_rows(cq_t.data_as<float>(), s, q_in, q_in, cfg.rms_eps);
    cq = cq_t.data_as<float>();
  }
  Tensor q = Tensor::empty({1, s, hl, dqk}, DType::kFloat32);
  float* qp = q.data_as<float>();
  for (int64_t h = 0; h < hl; ++h) {
    gemm(s, nope, q_in, cq, q_in, weights.w_uq.data_as<float>() + (lo + h) * nope, wn * nope,
         qp + h * dqk, hl * dqk);
    if (rope > 0)
      gemm(s, rope, q_in, cq, q_in, weights.w_qr.data_as<float>() + (lo + h) * rope, wn * rope,
           qp + h * dqk + nope, hl * dqk);
  }
  for (int64_t t = 0; t < s; ++t)
    for (int64_t h = 0; h < hl; ++h)
      rope_inplace(qp + (t * hl + h) * dqk + nope, rope, t, cfg.rope_theta);

  // Latent path (identical on every rank: x is replicated).
  std::vector<float> c(static_cast<size_t>(s * dl)), kpe(static_cast<size_t>(s * rope));
  gemm(s, dl, hid, xp, hid, weights.w_dkv.data_as<float>(), dl, c.data(), dl);
  rms_normalize_rows(c.data(), s, dl, dl, cfg.rms_eps);
  if (rope > 0) {
    gemm(s, rope, hid, xp, hid, weights.w_kr.data_as<float>(), rope, kpe.data(), rope);
    for (int64_t t = 0; t < s; ++t) rope_inplace(kpe.data() + t * rope, rope, t, cfg.rope_theta);
  }
  std::vector<float> cg(c);
  const float* gamma = weights.gamma.data_as<float>();
  for (int64_t t = 0; t < s; ++t)
    for (int64_t j = 0; j < dl; ++j) cg[static_cast<size_t>(t * dl + j)] *= gamma[j];

  // Up-projected keys/values of the local heads: ordinary attention with head dim 192/128.
  Tensor k = Tensor::empty({1, s, hl, dqk}, DType::kFloat32);
  Tensor v = Tensor::empty({1, s, hl, dv}, DType::kFloat32);
  float* kp = k.data_as<float>();
  float* vp = v.data_as<float>();
  for (int64_t h = 0; h < hl; ++h) {
    gemm_bt(s, nope, dl, cg.data(), dl, weights.w_uk.data_as<float>() + (lo + h) * nope * dl, dl,
            kp + h * dqk, hl * dqk);
    gemm_bt(s, dv, dl, cg.data(), dl, weights.w_uv.data_as<float>() + (lo + h) * dv * dl, dl,
            vp + h * dv, hl * dv);
    for (int64_t t = 0; t < s; ++t)
      std::memcpy(kp + (t * hl + h) * dqk + nope, kpe.data() + t * rope,
                  static_cast<size_t>(rope) * 4);
  }
  Tensor o = Tensor::empty({1, s, hl, dv}, DType::kFloat32);
  Tensor lse = Tensor::empty({1, hl, s}, DType::kFloat32);
  ops::AttentionOptions ao;
  ao.softmax_scale = cfg.scale();
  ao.causal = true;
  ops::attention_forward(q, k, v, o, lse, ao);

  // Row-parallel output projection + all-reduce.
  MlaPrefillResult res;
  res.y = Tensor::empty({s, hid}, DType::kFloat32);
  gemm(s, hid, hl * dv, o.data_as<float>(), hl * dv, weights.w_o.data_as<float>() + lo * dv * hid,
       hid, res.y.data_as<float>(), hid);
  tp.all_reduce(res.y.data(), res.y.data(), static_cast<size_t>(s * hid), DType::kFloat32,
                comm::ReduceOp::kSum);
  res.cache = MlaCache(capacity, cfg.page_size, dl, rope, cache_dtype);
  res.cache.append(c.data(), kpe.data(), s);
  return res;
}

// ---- fp64 reference ----------------------------------------------------------------------

MlaReference mla_reference_forward(const MlaConfig& cfg, const MlaWeights& w, const float* x,
                                   int64_t seq) {
  cfg.validate();
  w.check(cfg, 0, cfg.heads);
  const int64_t h = cfg.heads, nope = cfg.qk_nope, rope = cfg.qk_rope, dv = cfg.v_head;
  const int64_t dl = cfg.kv_lora_rank, hid = cfg.hidden;
  const int64_t q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : hid;
  const double eps = cfg.rms_eps, scale = cfg.scale();
  auto vec_mat = [](const double* v, const float* m, int64_t rows, int64_t cols, int64_t ld,
                    double* out) {
    for (int64_t j = 0; j < cols; ++j) out[j] = 0;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) out[j] += v[i] * static_cast<double>(m[i * ld + j]);
  };
  auto normalize = [eps](double* v, int64_t d) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += v[i] * v[i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + eps);
    for (int64_t i = 0; i < d; ++i) v[i] *= inv;
  };
  MlaReference ref;
  ref.y.assign(static_cast<size_t>(seq * hid), 0.0);
  ref.latent.assign(static_cast<size_t>(seq * dl), 0.0);
  ref.k_pe.assign(static_cast<size_t>(seq * rope), 0.0);
  std::vector<double> qn(static_cast<size_t>(seq * h * nope)),
      qr(static_cast<size_t>(seq * h * rope));
  std::vector<double> kn(static_cast<size_t>(seq * h * nope)),
      vv(static_cast<size_t>(seq * h * dv));
  std::vector<double> xd(static_cast<size_t>(hid)), cq(static_cast<size_t>(q_in)),
      cg(static_cast<size_t>(dl));
  for (int64_t t = 0; t < seq; ++t) {
    for (int64_t i = 0; i < hid; ++i) xd[i] = x[t * hid + i];
    if (cfg.q_lora_rank > 0) {
      vec_mat(xd.data(), w.w_dq.data_as<float>(), hid, q_in, q_in, cq.data());
      normalize(cq.data(), q_in);
    } else {
      cq = xd;
    }
    vec_mat(cq.data(), w.w_uq.data_as<float>(), q_in, h * nope, h * nope, qn.data() + t * h * nope);
    vec_mat(cq.data(), w.w_qr.data_as<float>(), q_in, h * rope, h * rope, qr.data() + t * h * rope);
    for (int64_t hh = 0; hh < h; ++hh)
      rope_inplace(qr.data() + (t * h + hh) * rope, rope, t, cfg.rope_theta);
    double* c = ref.latent.data() + t * dl;
    vec_mat(xd.data(), w.w_dkv.data_as<float>(), hid, dl, dl, c);
    normalize(c, dl);
    double* kr = ref.k_pe.data() + t * rope;
    vec_mat(xd.data(), w.w_kr.data_as<float>(), hid, rope, rope, kr);
    rope_inplace(kr, rope, t, cfg.rope_theta);
    for (int64_t j = 0; j < dl; ++j) cg[j] = c[j] * w.gamma.data_as<float>()[j];
    for (int64_t hh = 0; hh < h; ++hh) {
      for (int64_t i = 0; i < nope; ++i) {
        double a = 0;
        const float* row = w.w_uk.data_as<float>() + (hh * nope + i) * dl;
        for (int64_t j = 0; j < dl; ++j) a += row[j] * cg[j];
        kn[(t * h + hh) * nope + i] = a;
      }
      for (int64_t i = 0; i < dv; ++i) {
        double a = 0;
        const float* row = w.w_uv.data_as<float>() + (hh * dv + i) * dl;
        for (int64_t j = 0; j < dl; ++j) a += row[j] * cg[j];
        vv[(t * h + hh) * dv + i] = a;
      }
    }
  }
  std::vector<double> s(static_cast<size_t>(seq)), o(static_cast<size_t>(h * dv));
  for (int64_t t = 0; t < seq; ++t) {
    for (int64_t hh = 0; hh < h; ++hh) {
      double mx = -INFINITY;
      for (int64_t u = 0; u <= t; ++u) {
        double a = 0;
        for (int64_t i = 0; i < nope; ++i)
          a += qn[(t * h + hh) * nope + i] * kn[(u * h + hh) * nope + i];
        for (int64_t i = 0; i < rope; ++i)
          a += qr[(t * h + hh) * rope + i] * ref.k_pe[u * rope + i];
        s[u] = scale * a;
        mx = std::max(mx, s[u]);
      }
      double l = 0;
      for (int64_t u = 0; u <= t; ++u) l += std::exp(s[u] - mx);
      for (int64_t i = 0; i < dv; ++i) o[hh * dv + i] = 0;
      for (int64_t u = 0; u <= t; ++u) {
        const double pr = std::exp(s[u] - mx) / l;
        for (int64_t i = 0; i < dv; ++i) o[hh * dv + i] += pr * vv[(u * h + hh) * dv + i];
      }
    }
    vec_mat(o.data(), w.w_o.data_as<float>(), h * dv, hid, hid, ref.y.data() + t * hid);
  }
  return ref;
}

std::vector<float> mla_absorbed_queries(const MlaConfig& cfg, const MlaWeights& w, const float* x,
                                        int64_t n) {
  cfg.validate();
  w.check(cfg, 0, cfg.heads);
  const int64_t h = cfg.heads, nope = cfg.qk_nope, dl = cfg.kv_lora_rank, hid = cfg.hidden;
  const int64_t q_in = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : hid;
  std::vector<float> cq(static_cast<size_t>(n * q_in));
  if (cfg.q_lora_rank > 0) {
    gemm(n, q_in, hid, x, hid, w.w_dq.data_as<float>(), q_in, cq.data(), q_in);
    rms_normalize_rows(cq.data(), n, q_in, q_in, cfg.rms_eps);
  } else {
    std::memcpy(cq.data(), x, static_cast<size_t>(n * hid) * 4);
  }
  std::vector<float> qn(static_cast<size_t>(n * h * nope));
  gemm(n, h * nope, q_in, cq.data(), q_in, w.w_uq.data_as<float>(), h * nope, qn.data(), h * nope);
  std::vector<float> out(static_cast<size_t>(n * h * dl));
  for (int64_t hh = 0; hh < h; ++hh)
    gemm(n, dl, nope, qn.data() + hh * nope, h * nope, w.w_uk.data_as<float>() + hh * nope * dl, dl,
         out.data() + hh * dl, h * dl);
  const float* gamma = w.gamma.data_as<float>();
  for (int64_t i = 0; i < n * h; ++i)
    for (int64_t j = 0; j < dl; ++j) out[static_cast<size_t>(i * dl + j)] *= gamma[j];
  return out;
}

}  // namespace distattn::parallel
