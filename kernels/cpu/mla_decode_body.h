#pragma once
// The MLA decode kernel body, compiled twice: portably (mla_decode.cpp) and with AVX-512
// flags (mla_decode_avx512.cpp). Everything that holds code lives in an anonymous namespace
// so the two builds never share an out-of-line function (no ODR mixing of instruction
// sets); the caller allocates all scratch, so this body instantiates no std templates.
//
// Algorithm per (sequence, split of its tokens): tiles of kTile tokens are gathered from
// the pages into fp32 scratch (transposed keys Kt [W][kTile], values V [kTile][Dl]); for
// each block of 4 heads: logits (row of q) x Kt, online softmax update, P x V into the
// head's accumulator. All heads reuse one tile: the cache is a single KV head.
#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "kernels/cpu/transpose16.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

namespace distattn::kernels::cpu::detail {

constexpr int kMlaTile = 64;

struct MlaDecodeParams {
  int64_t batch = 0, heads = 0, latent = 0, rope = 0;  // Dl, Dr
  const float* q_lat = nullptr;  // [B, H, Dl] strides below (last dim contiguous)
  int64_t ql_sb = 0, ql_sh = 0;
  const float* q_pe = nullptr;  // [B, H, Dr]
  int64_t qp_sb = 0, qp_sh = 0;
  const void* pages = nullptr;  // [num_pages, page_size, W]
  bool pages_bf16 = false;
  int64_t pg_s0 = 0, pg_s1 = 0, page_size = 0;
  const int32_t* page_table = nullptr;
  int64_t pt_s0 = 0, pt_s1 = 0;
  const int32_t* seq_lens = nullptr;
  int64_t sl_s0 = 0;
  float* out = nullptr;  // [B, H, Dl]
  int64_t o_sb = 0, o_sh = 0;
  float* lse = nullptr;  // [B, H]
  int64_t l_sb = 0, l_sh = 0;
  float scale = 1.0f, mu = 1.0f;
  int splits = 1;                   // per sequence
  int threads = 1;                  // OpenMP threads to use
  float* thread_scratch = nullptr;  // threads * thread_scratch_floats
  int64_t thread_scratch_floats = 0;
  float* part_acc = nullptr;  // [B*splits, H, Dl]
  float* part_m = nullptr;    // [B*splits, H]
  float* part_l = nullptr;    // [B*splits, H]
};

// Tokens per AMX step (two 16-row tiles; a kMlaTile tile is two steps).
constexpr int kMlaAmxTokens = 32;

// Floats of per-thread scratch the AMX task needs (below): the query's three bf16 parts as
// B words [part][head block][W32/2][16], a token tile [32][W32] bf16, its value pairs
// [16][Dl16] words, the scores [32][16], P's three parts [3][16][16] words, a transpose
// block, and a 16-head block of accumulators [16][Dl16].
inline int64_t mla_amx_scratch_floats(int64_t heads, int64_t latent, int64_t rope) {
  const int64_t w32 = (latent + rope + 31) / 32 * 32, h16 = (heads + 15) / 16 * 16;
  const int64_t dl16 = (latent + 15) / 16 * 16;
  return 3 * (w32 / 2) * h16 + kMlaAmxTokens * w32 / 2 + (kMlaAmxTokens / 2) * dl16 +
         kMlaAmxTokens * 16 + 4 * 256 + 16 * dl16 + 64;
}

// Floats of per-thread scratch the body needs (either task).
inline int64_t mla_thread_scratch_floats(int64_t heads, int64_t latent, int64_t rope) {
  const int64_t w = latent + rope;
  const int64_t simd = 2 * w * kMlaTile + heads * w + 2 * 4 * kMlaTile + 64;
  const int64_t amx = mla_amx_scratch_floats(heads, latent, rope);
  return simd > amx ? simd : amx;
}

}  // namespace distattn::kernels::cpu::detail

namespace {

using distattn::kernels::cpu::detail::kMlaAmxTokens;
using distattn::kernels::cpu::detail::kMlaTile;
using distattn::kernels::cpu::detail::MlaDecodeParams;

inline float mla_fmax(float a, float b) {
  return a > b ? a : b;
}

inline float mla_bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp), branch-free so that loops vectorize.
// Results below 2^-126 flush to 0; exp(-inf) = 0.
inline float mla_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  const int32_t bits = (n + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return y * s;
}

#if defined(__AVX512F__)
// 16 lanes of mla_exp: same polynomial, 2^n applied with scalef.
inline __m512 mla_exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 fx = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}
#endif

// s[hh][t] = q[hh] . Kt[:, t] for HB heads and one tile.
template <int HB>
inline void mla_qk(const float* const* q, const float* kt, int64_t w, float (*s)[kMlaTile]) {
#if defined(__AVX512F__)
  // 4 heads x 64 tokens = 16 zmm accumulators; per latent index: 4 loads, 4 broadcasts,
  // 16 FMAs.
  static_assert(kMlaTile == 64);
  __m512 acc[HB][4];
  for (int hh = 0; hh < HB; ++hh)
    for (int j = 0; j < 4; ++j) acc[hh][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < w; ++d) {
    const float* kr = kt + d * kMlaTile;
    const __m512 k0 = _mm512_loadu_ps(kr), k1 = _mm512_loadu_ps(kr + 16);
    const __m512 k2 = _mm512_loadu_ps(kr + 32), k3 = _mm512_loadu_ps(kr + 48);
    for (int hh = 0; hh < HB; ++hh) {
      const __m512 qb = _mm512_set1_ps(q[hh][d]);
      acc[hh][0] = _mm512_fmadd_ps(qb, k0, acc[hh][0]);
      acc[hh][1] = _mm512_fmadd_ps(qb, k1, acc[hh][1]);
      acc[hh][2] = _mm512_fmadd_ps(qb, k2, acc[hh][2]);
      acc[hh][3] = _mm512_fmadd_ps(qb, k3, acc[hh][3]);
    }
  }
  for (int hh = 0; hh < HB; ++hh)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(s[hh] + 16 * j, acc[hh][j]);
#else
  for (int hh = 0; hh < HB; ++hh)
    for (int t = 0; t < kMlaTile; ++t) s[hh][t] = 0.0f;
  for (int64_t d = 0; d < w; ++d) {
    const float* kr = kt + d * kMlaTile;
#pragma GCC unroll 4
    for (int hh = 0; hh < HB; ++hh) {
      const float qv = q[hh][d];
      float* sr = s[hh];
#pragma omp simd
      for (int t = 0; t < kMlaTile; ++t) sr[t] += qv * kr[t];
    }
  }
#endif
}

// acc[hh][:] = alpha[hh] * acc[hh][:] + sum_t p[hh][t] * V[t][:], in 64-wide column blocks
// so the HB accumulator rows stay in registers across the token loop.
template <int HB>
inline void mla_pv(float* const* acc, const float* alpha, const float (*p)[kMlaTile],
                   const float* v, int64_t ldv, int64_t dl, int nt) {
  int64_t d_fast = 0;
#if defined(__AVX512F__)
  // Full 64-wide column blocks: 4 heads x 4 zmm accumulators; per token 4 loads,
  // 4 broadcasts, 16 FMAs.
  for (; d_fast + 64 <= dl; d_fast += 64) {
    __m512 a[HB][4];
    for (int hh = 0; hh < HB; ++hh) {
      const __m512 al = _mm512_set1_ps(alpha[hh]);
      for (int j = 0; j < 4; ++j)
        a[hh][j] = _mm512_mul_ps(al, _mm512_loadu_ps(acc[hh] + d_fast + 16 * j));
    }
    for (int t = 0; t < nt; ++t) {
      const float* vr = v + t * ldv + d_fast;
      const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16);
      const __m512 v2 = _mm512_loadu_ps(vr + 32), v3 = _mm512_loadu_ps(vr + 48);
      for (int hh = 0; hh < HB; ++hh) {
        const __m512 pb = _mm512_set1_ps(p[hh][t]);
        a[hh][0] = _mm512_fmadd_ps(pb, v0, a[hh][0]);
        a[hh][1] = _mm512_fmadd_ps(pb, v1, a[hh][1]);
        a[hh][2] = _mm512_fmadd_ps(pb, v2, a[hh][2]);
        a[hh][3] = _mm512_fmadd_ps(pb, v3, a[hh][3]);
      }
    }
    for (int hh = 0; hh < HB; ++hh)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc[hh] + d_fast + 16 * j, a[hh][j]);
  }
#endif
  for (int64_t d0 = d_fast; d0 < dl; d0 += 64) {
    const int64_t dw = dl - d0 < 64 ? dl - d0 : 64;
    float a[HB][64];
    for (int hh = 0; hh < HB; ++hh) {
      const float al = alpha[hh];
      const float* src = acc[hh] + d0;
#pragma omp simd
      for (int64_t d = 0; d < dw; ++d) a[hh][d] = al * src[d];
    }
    for (int t = 0; t < nt; ++t) {
      const float* vr = v + t * ldv + d0;
#pragma GCC unroll 4
      for (int hh = 0; hh < HB; ++hh) {
        const float pv = p[hh][t];
#pragma omp simd
        for (int64_t d = 0; d < dw; ++d) a[hh][d] += pv * vr[d];
      }
    }
    for (int hh = 0; hh < HB; ++hh) {
      float* dst = acc[hh] + d0;
#pragma omp simd
      for (int64_t d = 0; d < dw; ++d) dst[d] = a[hh][d];
    }
  }
}

// Online-softmax update of HB heads for one tile (nt valid tokens): p, alpha, m, l.
template <int HB>
inline void mla_softmax(float (*s)[kMlaTile], float (*p)[kMlaTile], int nt, float* m, float* l,
                        float* alpha) {
  for (int hh = 0; hh < HB; ++hh) {
    float mx = -INFINITY;
    const float* sm = s[hh];
#pragma omp simd reduction(max : mx)
    for (int t = 0; t < kMlaTile; ++t) mx = mla_fmax(mx, t < nt ? sm[t] : -INFINITY);
    const float m_new = mla_fmax(m[hh], mx);
    if (m_new == -INFINITY) {  // nothing finite yet: keep the state empty
      alpha[hh] = 1.0f;
      for (int t = 0; t < kMlaTile; ++t) p[hh][t] = 0.0f;
      continue;
    }
    alpha[hh] = m[hh] == -INFINITY ? 0.0f : mla_exp(m[hh] - m_new);
    float sum = 0.0f;
    const float* sr = s[hh];
    float* pr = p[hh];
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < kMlaTile; j += 16) {
      const int valid = nt - j;
      const __mmask16 k =
          valid >= 16 ? __mmask16(0xFFFF) : __mmask16(valid > 0 ? (1u << valid) - 1u : 0u);
      const __m512 e =
          _mm512_maskz_mov_ps(k, mla_exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mv)));
      _mm512_storeu_ps(pr + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#else
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < kMlaTile; ++t) {
      const float e = mla_exp(sr[t] - m_new);
      const float pv = t < nt ? e : 0.0f;
      pr[t] = pv;
      sum += pv;
    }
#endif
    l[hh] = l[hh] * alpha[hh] + sum;
    m[hh] = m_new;
  }
}

template <int HB>
inline void mla_head_block(const MlaDecodeParams& pr, int64_t h0, const float* qbuf,
                           const float* kt, const float* v, int nt, float* acc_base, float* m,
                           float* l, float* s_scr, float* p_scr) {
  const int64_t w = pr.latent + pr.rope;
  const float* q[HB];
  float* acc[HB];
  for (int hh = 0; hh < HB; ++hh) {
    q[hh] = qbuf + (h0 + hh) * w;
    acc[hh] = acc_base + (h0 + hh) * pr.latent;
  }
  auto* s = reinterpret_cast<float(*)[kMlaTile]>(s_scr);
  auto* p = reinterpret_cast<float(*)[kMlaTile]>(p_scr);
  float alpha[HB];
  mla_qk<HB>(q, kt, w, s);
  mla_softmax<HB>(s, p, nt, m + h0, l + h0, alpha);
  mla_pv<HB>(acc, alpha, p, v, w, pr.latent, nt);
}

#if defined(__AVX512F__)
// dst[c][r] = src[r][c] for a 16 x 16 block of floats (row strides lds, ldd).
inline void mla_transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  distattn::kernels::cpu::transpose16_words(reinterpret_cast<const uint32_t*>(src), lds,
                                            reinterpret_cast<uint32_t*>(dst), ldd);
}
#endif

// Gathers tokens [tok0, tok0 + nt) of sequence b: rows R [kTile][W] in fp32 (rows beyond nt
// zeroed; the latent part of R is the value tile) and the transposed keys Kt [W][kTile].
inline void mla_gather(const MlaDecodeParams& pr, int64_t b, int64_t tok0, int nt, float* kt,
                       float* rows) {
  const int64_t w = pr.latent + pr.rope;
  for (int t = 0; t < kMlaTile; ++t) {
    float* dst = rows + t * w;
    if (t >= nt) {
      for (int64_t d = 0; d < w; ++d) dst[d] = 0.0f;
      continue;
    }
    const int64_t tok = tok0 + t;
    const int64_t page = pr.page_table[b * pr.pt_s0 + (tok / pr.page_size) * pr.pt_s1];
    const int64_t off = page * pr.pg_s0 + (tok % pr.page_size) * pr.pg_s1;
    int64_t d = 0;
    if (pr.pages_bf16) {
      const uint16_t* src = static_cast<const uint16_t*>(pr.pages) + off;
#if defined(__AVX512F__)
      for (; d + 16 <= w; d += 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d));
        _mm512_storeu_ps(dst + d,
                         _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
#endif
      for (; d < w; ++d) dst[d] = mla_bf16_to_float(src[d]);
    } else {
      const float* src = static_cast<const float*>(pr.pages) + off;
      for (; d < w; ++d) dst[d] = src[d];
    }
  }
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 16 <= w; d0 += 16)
    for (int t0 = 0; t0 < kMlaTile; t0 += 16)
      mla_transpose16(rows + t0 * w + d0, w, kt + d0 * kMlaTile + t0, kMlaTile);
#endif
  for (; d0 < w; ++d0)
    for (int t = 0; t < kMlaTile; ++t) kt[d0 * kMlaTile + t] = rows[t * w + d0];
}

// A task's partial state before its first tile: no keys seen.
inline void mla_task_start(int64_t heads, int64_t latent, float* acc, float* m, float* l) {
  for (int64_t i = 0; i < heads * latent; ++i) acc[i] = 0.0f;
  for (int64_t i = 0; i < heads; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }
}

inline void mla_decode_task(const MlaDecodeParams& pr, int64_t task, float* scratch) {
  const int64_t b = task / pr.splits, split = task % pr.splits;
  const int64_t h = pr.heads, dl = pr.latent, dr = pr.rope, w = dl + dr;
  float* kt = scratch;
  float* v = kt + w * kMlaTile;  // rows [kTile][W]: the value tile is its latent part
  float* qbuf = v + kMlaTile * w;
  float* s_scr = qbuf + h * w;
  float* p_scr = s_scr + 4 * kMlaTile;
  float* const acc = pr.part_acc + task * h * dl;
  float* const m = pr.part_m + task * h;
  float* const l = pr.part_l + task * h;
  mla_task_start(h, dl, acc, m, l);
  // Pre-scaled query rows [mu*scale*q_lat | scale*q_pe]: one W-wide dot gives the logit.
  for (int64_t hh = 0; hh < h; ++hh) {
    const float* ql = pr.q_lat + b * pr.ql_sb + hh * pr.ql_sh;
    float* qr = qbuf + hh * w;
    const float sl = pr.scale * pr.mu;
    for (int64_t d = 0; d < dl; ++d) qr[d] = sl * ql[d];
    if (dr > 0) {
      const float* qp = pr.q_pe + b * pr.qp_sb + hh * pr.qp_sh;
      for (int64_t d = 0; d < dr; ++d) qr[dl + d] = pr.scale * qp[d];
    }
  }
  const int64_t len = pr.seq_lens[b * pr.sl_s0];
  const int64_t tiles = (len + kMlaTile - 1) / kMlaTile;
  const int64_t t_begin = tiles * split / pr.splits, t_end = tiles * (split + 1) / pr.splits;
  for (int64_t ti = t_begin; ti < t_end; ++ti) {
    const int64_t tok0 = ti * kMlaTile;
    const int nt = static_cast<int>(len - tok0 < kMlaTile ? len - tok0 : kMlaTile);
    mla_gather(pr, b, tok0, nt, kt, v);
    int64_t h0 = 0;
    for (; h0 + 4 <= h; h0 += 4)
      mla_head_block<4>(pr, h0, qbuf, kt, v, nt, acc, m, l, s_scr, p_scr);
    for (; h0 < h; ++h0) mla_head_block<1>(pr, h0, qbuf, kt, v, nt, acc, m, l, s_scr, p_scr);
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The AMX-BF16 task for bf16 pages. Per 32-token step and block of 16 heads:
//   S^T[t][h] = K[t] . (q0 + q1 + q2)[h]      tiles 0-1 (tokens 0-15, 16-31), A 2-3, B 4-6
//   online softmax per head (lanes = heads), natural exp as mla_softmax
//   O[h][:] += (p0 + p1 + p2)[h] . V           C tile 0, P parts 1-3, V pairs 4
// q (fp32, pre-scaled) and P are split into three bf16 parts (x = x0 + x1 + x2 to ~2^-24
// relative), so the products keep the fp32 kernel's accuracy; the cache values are bf16
// already, and the tiles accumulate in fp32.
struct alignas(64) MlaAmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Three bf16 parts of 16 floats (round to nearest even): x - x0 - x1 - x2 ~ 2^-24 |x|.
inline void mla_split3(__m512 x, __m256i* parts) {
  for (int k = 0; k < 3; ++k) {
    const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
    parts[k] = h;
    x = _mm512_sub_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
}

inline void mla_decode_task_amx(const MlaDecodeParams& pr, int64_t task, float* scratch) {
  const int64_t b = task / pr.splits, split = task % pr.splits;
  const int64_t h = pr.heads, dl = pr.latent, dr = pr.rope, w = dl + dr;
  const int64_t w32 = (w + 31) / 32 * 32, h16 = (h + 15) / 16 * 16, dl16 = (dl + 15) / 16 * 16;
  const int64_t hblocks = h16 / 16, ksteps = w32 / 32, w2 = w32 / 2;
  auto* qw = reinterpret_cast<uint32_t*>(scratch);                        // [3][hblocks][w2][16]
  auto* kt = reinterpret_cast<uint16_t*>(qw + 3 * w2 * h16);              // [32][w32]
  auto* vp = reinterpret_cast<uint32_t*>(kt + kMlaAmxTokens * w32);       // [16][dl16]
  float* st = reinterpret_cast<float*>(vp + (kMlaAmxTokens / 2) * dl16);  // [32][16]
  auto* pw = reinterpret_cast<uint32_t*>(st + kMlaAmxTokens * 16);        // [3][16][16]
  uint32_t* tb = pw + 3 * 256;                                            // [16][16]
  float* ob = reinterpret_cast<float*>(tb + 256);                         // [16][dl16]
  float* const acc = pr.part_acc + task * h * dl;
  float* const m = pr.part_m + task * h;
  float* const l = pr.part_l + task * h;
  mla_task_start(h, dl, acc, m, l);
  // The query rows [mu*scale*q_lat | scale*q_pe | 0...] as three parts of B words.
  auto* qh = reinterpret_cast<uint16_t*>(qw);
  for (int64_t hh = 0; hh < h16; ++hh) {
    const float* ql = hh < h ? pr.q_lat + b * pr.ql_sb + hh * pr.ql_sh : nullptr;
    const float* qp = hh < h && dr > 0 ? pr.q_pe + b * pr.qp_sb + hh * pr.qp_sh : nullptr;
    for (int64_t d0 = 0; d0 < w32; d0 += 16) {
      alignas(64) float v[16];
      for (int k = 0; k < 16; ++k) {
        const int64_t d = d0 + k;
        v[k] = hh >= h || d >= w ? 0.0f : d < dl ? pr.scale * pr.mu * ql[d] : pr.scale * qp[d - dl];
      }
      __m256i parts[3];
      mla_split3(_mm512_load_ps(v), parts);
      for (int p = 0; p < 3; ++p) {
        alignas(32) uint16_t u[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(u), parts[p]);
        uint16_t* base = qh + 2 * ((p * hblocks + hh / 16) * w2 * 16);
        for (int k = 0; k < 16; ++k) {
          const int64_t d = d0 + k;
          base[2 * ((d / 2) * 16 + hh % 16) + (d & 1)] = u[k];
        }
      }
    }
  }
  MlaAmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const int64_t len = pr.seq_lens[b * pr.sl_s0];
  const int64_t tiles = (len + kMlaTile - 1) / kMlaTile;
  const int64_t t_begin = tiles * split / pr.splits, t_end = tiles * (split + 1) / pr.splits;
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  alignas(64) static const uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                       21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                       11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t step = t_begin * (kMlaTile / kMlaAmxTokens);
       step < t_end * (kMlaTile / kMlaAmxTokens); ++step) {
    const int64_t tok0 = step * kMlaAmxTokens;
    if (tok0 >= len) break;
    const int nt = static_cast<int>(len - tok0 < kMlaAmxTokens ? len - tok0 : kMlaAmxTokens);
    // Gather the token rows (bf16, zero past W and past the last token).
    for (int t = 0; t < kMlaAmxTokens; ++t) {
      uint16_t* dst = kt + t * w32;
      int64_t d = 0;
      if (t < nt) {
        const int64_t tok = tok0 + t;
        const int64_t page = pr.page_table[b * pr.pt_s0 + (tok / pr.page_size) * pr.pt_s1];
        const uint16_t* src = static_cast<const uint16_t*>(pr.pages) + page * pr.pg_s0 +
                              (tok % pr.page_size) * pr.pg_s1;
        std::memcpy(dst, src, static_cast<size_t>(w) * 2);
        d = w;
      }
      for (; d < w32; ++d) dst[d] = 0;
    }
    // Value pairs vp[t2][e] = (V[2 t2][e], V[2 t2 + 1][e]), zero past Dl.
    for (int t2 = 0; t2 < kMlaAmxTokens / 2; ++t2) {
      const uint16_t* r0 = kt + 2 * t2 * w32;
      const uint16_t* r1 = r0 + w32;
      for (int64_t e = 0; e < dl16; e += 16) {
        const __mmask16 mk = dl - e >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (dl - e)) - 1u);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, r0 + e));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, r1 + e));
        _mm512_storeu_si512(vp + t2 * dl16 + e, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    for (int64_t hb = 0; hb < hblocks; ++hb) {
      const int64_t h0 = hb * 16, hn = h - h0 < 16 ? h - h0 : 16;
      // Scores.
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t ks = 0; ks < ksteps; ++ks) {
        _tile_loadd(2, kt + ks * 32, w32 * 2);
        _tile_loadd(3, kt + 16 * w32 + ks * 32, w32 * 2);
        _tile_loadd(4, qw + ((0 * hblocks + hb) * w2 + ks * 16) * 16, 64);
        _tile_loadd(5, qw + ((1 * hblocks + hb) * w2 + ks * 16) * 16, 64);
        _tile_loadd(6, qw + ((2 * hblocks + hb) * w2 + ks * 16) * 16, 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(0, 2, 5);
        _tile_dpbf16ps(0, 2, 6);
        _tile_dpbf16ps(1, 3, 4);
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(1, 3, 6);
      }
      _tile_stored(0, st, 64);
      _tile_stored(1, st + 256, 64);
      // Online softmax of the 16 heads (lanes) over the nt tokens.
      const __mmask16 hm = hn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << hn) - 1u);
      const __m512 m_old = _mm512_mask_loadu_ps(ninf, hm, m + h0);
      __m512 mx = m_old;
      for (int t = 0; t < nt; ++t) mx = _mm512_max_ps(mx, _mm512_loadu_ps(st + 16 * t));
      const __mmask16 none = _mm512_cmp_ps_mask(mx, ninf, _CMP_EQ_OQ);
      const __m512 mu = _mm512_mask_blend_ps(none, mx, _mm512_setzero_ps());
      const __m512 al =
          _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_old, ninf, _CMP_EQ_OQ),
                               mla_exp16(_mm512_sub_ps(m_old, mu)), _mm512_setzero_ps());
      __m512 sum = _mm512_setzero_ps();
      for (int t2 = 0; t2 < kMlaAmxTokens / 2; ++t2) {
        __m512 e[2];
        for (int k = 0; k < 2; ++k) {
          const int t = 2 * t2 + k;
          e[k] = t < nt ? mla_exp16(_mm512_sub_ps(_mm512_loadu_ps(st + 16 * t), mu))
                        : _mm512_setzero_ps();
          sum = _mm512_add_ps(sum, e[k]);
        }
        __m256i p0[3], p1[3];
        mla_split3(e[0], p0);
        mla_split3(e[1], p1);
        // Words (P[h][2 t2], P[h][2 t2 + 1]) for the 16 heads, staged as [t2][h].
        for (int p = 0; p < 3; ++p) {
          const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(p0[p]), p1[p], 1);
          _mm512_storeu_si512(pw + p * 256 + 16 * t2, _mm512_permutexvar_epi16(interleave, both));
        }
      }
      // Heads in rows, token pairs in columns: the A tiles of P V.
      for (int p = 0; p < 3; ++p) {
        std::memcpy(tb, pw + p * 256, 1024);
        distattn::kernels::cpu::transpose16_words(tb, 16, pw + p * 256, 16);
      }
      _mm512_mask_storeu_ps(l + h0, hm,
                            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(hm, l + h0), al, sum));
      _mm512_mask_storeu_ps(m + h0, hm, mx);
      // O = alpha O + P V; a partial head block or latent width goes through ob.
      alignas(64) float alv[16];
      _mm512_store_ps(alv, al);
      const bool direct = hn == 16 && dl16 == dl;
      float* const c = direct ? acc + h0 * dl : ob;
      const int64_t ldc = direct ? dl : dl16;
      for (int64_t hh = 0; hh < 16; ++hh) {
        float* row = c + hh * ldc;
        if (!direct) {
          for (int64_t d = 0; d < dl16; ++d)
            row[d] = hh < hn && d < dl ? acc[(h0 + hh) * dl + d] : 0.0f;
        }
        if (alv[hh] != 1.0f)
          for (int64_t d = 0; d < dl16; d += 16)
            _mm512_storeu_ps(row + d,
                             _mm512_mul_ps(_mm512_set1_ps(alv[hh]), _mm512_loadu_ps(row + d)));
      }
      _tile_loadd(1, pw, 64);
      _tile_loadd(2, pw + 256, 64);
      _tile_loadd(3, pw + 512, 64);
      for (int64_t e0 = 0; e0 < dl16; e0 += 16) {
        _tile_loadd(0, c + e0, ldc * 4);
        _tile_loadd(4, vp + e0, dl16 * 4);
        _tile_dpbf16ps(0, 1, 4);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(0, 3, 4);
        _tile_stored(0, c + e0, ldc * 4);
      }
      if (!direct)
        for (int64_t hh = 0; hh < hn; ++hh)
          for (int64_t d = 0; d < dl; ++d) acc[(h0 + hh) * dl + d] = ob[hh * dl16 + d];
    }
  }
  _tile_release();
}
#endif

// LSE merge of the splits of sequence b, head hh, into out/lse.
inline void mla_finish(const MlaDecodeParams& pr, int64_t b, int64_t hh) {
  const int64_t h = pr.heads, dl = pr.latent;
  float mx = -INFINITY;
  for (int s = 0; s < pr.splits; ++s) mx = mla_fmax(mx, pr.part_m[(b * pr.splits + s) * h + hh]);
  float* o = pr.out + b * pr.o_sb + hh * pr.o_sh;
  float* lse = pr.lse + b * pr.l_sb + hh * pr.l_sh;
  if (mx == -INFINITY) {
    for (int64_t d = 0; d < dl; ++d) o[d] = 0.0f;
    *lse = -INFINITY;
    return;
  }
  float total = 0.0f;
  for (int s = 0; s < pr.splits; ++s) {
    const int64_t task = b * pr.splits + s;
    const float ms = pr.part_m[task * h + hh];
    if (ms != -INFINITY) total += pr.part_l[task * h + hh] * std::exp(ms - mx);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < dl; ++d) o[d] = 0.0f;
  for (int s = 0; s < pr.splits; ++s) {
    const int64_t task = b * pr.splits + s;
    const float ms = pr.part_m[task * h + hh];
    if (ms == -INFINITY) continue;
    const float wgt = std::exp(ms - mx) * inv;
    const float* a = pr.part_acc + (task * h + hh) * dl;
#pragma omp simd
    for (int64_t d = 0; d < dl; ++d) o[d] += wgt * a[d];
  }
  *lse = mx + std::log(total);
}

inline void mla_decode_run(const MlaDecodeParams& pr) {
  const int64_t tasks = pr.batch * pr.splits;
#pragma omp parallel for schedule(dynamic, 1) num_threads(pr.threads)
  for (int64_t task = 0; task < tasks; ++task) {
    float* scratch = pr.thread_scratch + omp_get_thread_num() * pr.thread_scratch_floats;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (pr.pages_bf16) {
      mla_decode_task_amx(pr, task, scratch);
      continue;
    }
#endif
    mla_decode_task(pr, task, scratch);
  }
  const int64_t rows = pr.batch * pr.heads;
#pragma omp parallel for schedule(static) num_threads(pr.threads) if (rows * pr.latent > 65536)
  for (int64_t i = 0; i < rows; ++i) mla_finish(pr, i / pr.heads, i % pr.heads);
}

}  // namespace
