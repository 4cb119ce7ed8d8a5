#pragma once
// Streaming decode tiles (AVX-512): a few query rows per KV head (R = Sq * group <= 16)
// against a key range that every query sees in full. Decode has too few rows to fill the
// query lanes of the flash tiles, so this kernel puts keys in the lanes instead: 16 keys at
// a time, a score vector per query row from 16 dot products (vector accumulators along d,
// then one transposing reduction), the online softmax on that vector, and O += P V with
// the V rows as stored. Each K/V byte is read from memory once per call: the key range is
// walked in blocks of 16 keys, all KV heads of a block before the next block (the block's
// rows share pages). While a head step computes, its first row group requests the next
// step's rows line by line, each beside the load of the same line of this step (the hardware
// prefetchers do not follow rows that each lie in another page; a burst of requests at the
// start of a step overflowed the miss buffers). The query rows of a KV head go in groups of
// up to 4 that share every K and V vector loaded.
//
// Cache dtypes: fp32 and fp16 load 16 values per vector (fp16 through vcvtph2ps). bf16
// loads 32: the even values are word << 16 and the odd ones word & 0xffff0000, so q and
// the output accumulators are kept with even and odd elements of each 32 apart ("pair
// layout"), undone when the result is stored. With kDot (AVX512-BF16) and a bf16 query,
// the scores use vdpbf16ps on the words directly; P V keeps the exact fp32 path.
//
// Included by decode_stream_avx512.cpp (kDot false) and decode_stream_avx512bf16.cpp
// (kDot true); internal linkage, no exceptions (see flash_impl.h).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/flash_isa_avx512.h"

namespace distattn::kernels::cpu {
namespace {

constexpr int64_t kStreamKeys = 16;  // keys per block (one score vector)

enum class StreamLoad { kF32, kF16, kBf16 };

// Elements one vector load covers.
template <StreamLoad L>
constexpr int64_t kStreamWidth = L == StreamLoad::kBf16 ? 32 : 16;
// Bytes per element.
template <StreamLoad L>
constexpr int64_t kStreamBytes = L == StreamLoad::kF32 ? 4 : 2;

inline __mmask32 tail_mask32(int64_t n) {
  return n >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                 : (n <= 0 ? 0 : static_cast<__mmask32>((1u << n) - 1u));
}
inline __mmask16 tail_mask16(int64_t n) {
  return n <= 0 ? static_cast<__mmask16>(0) : tail_mask(n);
}

// Vector x of a row as fp32: for kF32/kF16 one vector (lo) of elements [16x, 16x+16); for
// kBf16 the even (lo) and odd (hi) elements of [32x, 32x+32). `n` valid elements left.
template <StreamLoad L>
inline void load_split(const void* row, int64_t x, int64_t n, __m512& lo, __m512& hi) {
  if constexpr (L == StreamLoad::kF32) {
    lo = _mm512_maskz_loadu_ps(tail_mask16(n), static_cast<const float*>(row) + 16 * x);
    (void)hi;
  } else if constexpr (L == StreamLoad::kF16) {
    lo = _mm512_cvtph_ps(
        _mm256_maskz_loadu_epi16(tail_mask16(n), static_cast<const uint16_t*>(row) + 16 * x));
    (void)hi;
  } else {
    const __m512i w =
        _mm512_maskz_loadu_epi16(tail_mask32(n), static_cast<const uint16_t*>(row) + 32 * x);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}

// Lane j of the result = sum of the 16 lanes of acc[j].
inline __m512 reduce16(__m512* acc) {
  __m512 u[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                         _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  __m512 w[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
    w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // w[i]: per 128-bit lane L, keys 4i..4i+3 summed over the lanes' share of d.
  const __m512 y01 =
      _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
  const __m512 y23 =
      _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xDD));
}

// Scores of RG query rows against 16 keys (rows k + j*ks, D elements each): s[r] lane j =
// q_r . k_j. Query row r is qrows + r*qld floats: fp32 (pair layout for kBf16), or with
// kDotRow the bf16 words as stored, zero past D. The 16 keys go in 16/KQ steps of KQ keys,
// RG * KQ = 16 accumulators each, so every K vector loaded feeds RG FMAs and every query
// vector KQ; one transposing reduction per step, then the steps' lanes are regrouped by row.
template <StreamLoad L, bool kDotRow, int RG, int KQ>
inline void scores_group(__m512* s, const float* qrows, int64_t qld, const char* k, int64_t ks,
                         int64_t D, const char* knext) {
  static_assert(RG * KQ == kStreamKeys, "RG rows x KQ keys fill the 16 accumulators");
  constexpr int64_t W = kStreamWidth<L>;
  constexpr int kSteps = kStreamKeys / KQ;
  __m512 red[kSteps];  // step c: lane r*KQ + t = row r, key c*KQ + t
#pragma GCC unroll 4
  for (int c = 0; c < kSteps; ++c) {
    __m512 acc[kStreamKeys];
#pragma GCC unroll 16
    for (int a = 0; a < kStreamKeys; ++a) acc[a] = _mm512_setzero_ps();
    const char* kc = k + c * KQ * ks;
    const char* kcn = knext != nullptr ? knext + c * KQ * ks : nullptr;
    for (int64_t x = 0; x * W < D; ++x) {
      const int64_t n = D - x * W;
      if (kcn != nullptr) {
#pragma GCC unroll 16
        for (int t = 0; t < KQ; ++t)
          _mm_prefetch(kcn + t * ks + x * W * kStreamBytes<L>, _MM_HINT_T0);
      }
      if constexpr (kDotRow) {
#if defined(__AVX512BF16__)
        const __mmask32 mk = tail_mask32(n);
        __m512i kv[KQ];
#pragma GCC unroll 16
        for (int t = 0; t < KQ; ++t)
          kv[t] =
              _mm512_maskz_loadu_epi16(mk, reinterpret_cast<const uint16_t*>(kc + t * ks) + 32 * x);
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) {
          const __m512bh qv = reinterpret_cast<__m512bh>(
              _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(qrows + r * qld) + 32 * x));
#pragma GCC unroll 16
          for (int t = 0; t < KQ; ++t)
            acc[r * KQ + t] =
                _mm512_dpbf16_ps(acc[r * KQ + t], qv, reinterpret_cast<__m512bh>(kv[t]));
        }
#endif
      } else {
        __m512 ke[KQ], ko[KQ];
#pragma GCC unroll 16
        for (int t = 0; t < KQ; ++t) load_split<L>(kc + t * ks, x, n, ke[t], ko[t]);
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) {
          const float* qr = qrows + r * qld + W * x;
          const __m512 qe = _mm512_loadu_ps(qr);
#pragma GCC unroll 16
          for (int t = 0; t < KQ; ++t)
            acc[r * KQ + t] = _mm512_fmadd_ps(qe, ke[t], acc[r * KQ + t]);
          if constexpr (L == StreamLoad::kBf16) {
            const __m512 qo = _mm512_loadu_ps(qr + 16);
#pragma GCC unroll 16
            for (int t = 0; t < KQ; ++t)
              acc[r * KQ + t] = _mm512_fmadd_ps(qo, ko[t], acc[r * KQ + t]);
          }
        }
      }
    }
    red[c] = reduce16(acc);
  }
  if constexpr (KQ == 16) {
    s[0] = red[0];
  } else if constexpr (KQ == 8) {  // row r = 256-bit half r of both steps
    s[0] = _mm512_shuffle_f32x4(red[0], red[1], 0x44);
    s[1] = _mm512_shuffle_f32x4(red[0], red[1], 0xEE);
  } else {  // KQ 4: row r = 128-bit block r of the four steps (a 4 x 4 block transpose)
    const __m512 t0 = _mm512_shuffle_f32x4(red[0], red[1], 0x44);
    const __m512 t1 = _mm512_shuffle_f32x4(red[0], red[1], 0xEE);
    const __m512 t2 = _mm512_shuffle_f32x4(red[2], red[3], 0x44);
    const __m512 t3 = _mm512_shuffle_f32x4(red[2], red[3], 0xEE);
    s[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
    s[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
    s[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
    s[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
  }
}

// Calls f.template operator()<NL>(x0) over `vecs` vector loads in blocks of up to kMax (8,
// 4, 2, 1): every load but the very last one of a row is full.
template <int kMax, class F>
inline void for_each_vec_block(int64_t vecs, F&& f) {
  for (int64_t x0 = 0; x0 < vecs;) {
    const int64_t left = vecs - x0;
    if (kMax >= 8 && left >= 8) {
      f.template operator()<(kMax >= 8 ? 8 : 1)>(x0);
      x0 += 8;
    } else if (kMax >= 4 && left >= 4) {
      f.template operator()<(kMax >= 4 ? 4 : 1)>(x0);
      x0 += 4;
    } else if (kMax >= 2 && left >= 2) {
      f.template operator()<(kMax >= 2 ? 2 : 1)>(x0);
      x0 += 2;
    } else {
      f.template operator()<1>(x0);
      x0 += 1;
    }
  }
}

// o_r (+)= sum_j p_r[j] * V_j for RG rows (o_r = o + r*old, p_r = p + r*16) and the nk keys
// v + j*vs, over NL loads from load x0 of the row (NL fp32 accumulators per row, 2*NL for
// kBf16 in pair layout); only the last load can be partial (`n_last` elements). alpha[r]
// scales row r's old accumulator first. Every V vector loaded feeds RG rows.
template <StreamLoad L, int RG, int NL>
inline void pv_group(float* o, int64_t old, const float* alpha, const float* p, const char* v,
                     int64_t vs, int64_t nk, int64_t x0, int64_t n_last, const char* vnext) {
  constexpr int64_t W = kStreamWidth<L>;
  constexpr int NA = L == StreamLoad::kBf16 ? 2 * NL : NL;
  __m512 acc[RG][NA];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) {
    const __m512 va = _mm512_set1_ps(alpha[r]);
    const float* orow = o + r * old + W * x0;
#pragma GCC unroll 16
    for (int a = 0; a < NA; ++a) acc[r][a] = _mm512_mul_ps(va, _mm512_loadu_ps(orow + 16 * a));
  }
  for (int64_t j = 0; j < nk; ++j) {
    const char* vr = v + j * vs;
    if (vnext != nullptr) {
#pragma GCC unroll 8
      for (int x = 0; x < NL; ++x)
        _mm_prefetch(vnext + j * vs + (x0 + x) * W * kStreamBytes<L>, _MM_HINT_T0);
    }
    __m512 vv[NA];
#pragma GCC unroll 8
    for (int x = 0; x < NL; ++x) {
      __m512 lo, hi;
      load_split<L>(vr, x0 + x, x == NL - 1 ? n_last : W, lo, hi);
      if constexpr (L == StreamLoad::kBf16) {
        vv[2 * x] = lo;
        vv[2 * x + 1] = hi;
      } else {
        vv[x] = lo;
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r * kStreamKeys + j]);
#pragma GCC unroll 16
      for (int a = 0; a < NA; ++a) acc[r][a] = _mm512_fmadd_ps(pj, vv[a], acc[r][a]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) {
    float* orow = o + r * old + W * x0;
#pragma GCC unroll 16
    for (int a = 0; a < NA; ++a) _mm512_storeu_ps(orow + 16 * a, acc[r][a]);
  }
}

inline float hmax(__m512 x) {
  return _mm512_reduce_max_ps(x);
}
inline float hsum(__m512 x) {
  return _mm512_reduce_add_ps(x);
}

// Pair layout position of element e (kBf16 vectors of 32: evens first, then odds).
inline int64_t pair_pos(int64_t e) {
  return (e & ~int64_t{31}) + ((e & 1) << 4) + ((e & 31) >> 1);
}

// One call: p.batch sequences, every key of p.seq_k visible to every query (the caller
// checked the mask), Sq * (Hq / Hkv) <= kDecodeStreamMaxRows, fp32 out and lse.
template <StreamLoad L, bool kDot>
void decode_stream_impl(const FlashForwardParams& p) {
  constexpr int64_t W = kStreamWidth<L>;
  const int64_t Sq = p.seq_q, Hq = p.heads_q, Hkv = p.heads_kv, D = p.head_dim, Dv = p.head_dim_v,
                n = p.seq_k;
  const int64_t g = Hq / Hkv, R = Sq * g;
  const int64_t Dp = (D + 31) / 32 * 32, Dvp = (Dv + 31) / 32 * 32;
  const int64_t es = static_cast<int64_t>(dtype_size(p.k.dtype));
  const float c2 = p.scale * kLog2e;
  // kDot: the query rows are the bf16 words as stored (Dp / 2 floats of room each).
  constexpr bool kDotRow = kDot && L == StreamLoad::kBf16;
  // State of row r of KV head hk at [hk * R + r]: q (Dp floats), o (Dvp), m, l.
  const int64_t rows = Hkv * R;
  // tail_k / tail_v: the last, partial key block of a head, copied with zero rows after the
  // end. One allocation per call (paged decode calls this per run of pages), in 64-byte
  // aligned sections.
  const int64_t kts = Dp * es, vts = Dvp * es;
  const auto section = [](int64_t floats) { return (floats + 15) / 16 * 16; };
  const int64_t sizes[7] = {rows * Dp,
                            rows * Dvp,
                            2 * rows,
                            4 * kStreamKeys,
                            Dp,
                            kStreamKeys * kts / 4,
                            kStreamKeys * vts / 4};
  int64_t total = 0;
  for (int64_t x : sizes) total += section(x);
  FloatBuffer scratch(total);
  float* parts[7];
  int64_t off = 0;
  for (int i = 0; i < 7; ++i) {
    parts[i] = scratch.get() + off;
    off += section(sizes[i]);
  }
  float* const qb = parts[0];
  float* const ob = parts[1];
  float* m = parts[2];
  float* l = m + rows;
  float* const pb = parts[3];
  float* const rowp = parts[4];
  float* const tail_k = parts[5];
  float* const tail_v = parts[6];
  const int64_t vvecs = (Dv + W - 1) / W;

  // The hook (set only on the caller's thread 0) runs at entry and every 64 blocks.
  if (p.progress != nullptr) p.progress(p.progress_ctx);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / g, h = hk * g + r % g;
        const int64_t idx = hk * R + r;
        const char* src = byte_ptr(p.q.data, p.q.dtype, b * p.q.sb + i * p.q.ss + h * p.q.sh);
        float* qr = qb + idx * Dp;
        std::fill(qr, qr + Dp, 0.f);
        if constexpr (kDotRow) {
          std::memcpy(qr, src, static_cast<size_t>(D) * 2);
        } else {
          load_row(src, p.q.dtype, D, rowp, c2);
          for (int64_t d = 0; d < D; ++d) qr[L == StreamLoad::kBf16 ? pair_pos(d) : d] = rowp[d];
        }
        std::fill(ob + idx * Dvp, ob + (idx + 1) * Dvp, 0.f);
        m[idx] = kNegInf;
        l[idx] = 0.f;
      }
    const char* kb = byte_ptr(p.k.data, p.k.dtype, b * p.k.sb);
    const char* vb = byte_ptr(p.v.data, p.v.dtype, b * p.v.sb);
    const int64_t kss = p.k.ss * es, ksh = p.k.sh * es, vss = p.v.ss * es, vsh = p.v.sh * es;
    const __m512 ninf = _mm512_set1_ps(kNegInf);

    for (int64_t j0 = 0; j0 < n; j0 += kStreamKeys) {
      const int64_t nk = std::min(kStreamKeys, n - j0);
      const __mmask16 valid = tail_mask(nk);
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const char* kr = kb + j0 * kss + hk * ksh;
        const char* vr = vb + j0 * vss + hk * vsh;
        int64_t ks = kss, vs = vss;
        if (nk < kStreamKeys) {
          char* tk = reinterpret_cast<char*>(tail_k);
          char* tv = reinterpret_cast<char*>(tail_v);
          std::memset(tk, 0, static_cast<size_t>(kStreamKeys * kts));
          std::memset(tv, 0, static_cast<size_t>(kStreamKeys * vts));
          for (int64_t j = 0; j < nk; ++j) {
            std::memcpy(tk + j * kts, kr + j * kss, static_cast<size_t>(D * es));
            std::memcpy(tv + j * vts, vr + j * vss, static_cast<size_t>(Dv * es));
          }
          kr = tk;
          vr = tv;
          ks = kts;
          vs = vts;
        }
        // The next head step's rows (head hk + 1 of this block, or head 0 of the next one),
        // fetched by the first row group line by line beside the loads of this step's.
        const int64_t hn = hk + 1 < Hkv ? hk + 1 : 0;
        const int64_t jn = hk + 1 < Hkv ? j0 : j0 + kStreamKeys;
        const bool pf_next = nk == kStreamKeys && jn + kStreamKeys <= n;
        const char* knext = pf_next ? kb + jn * kss + hn * ksh : nullptr;
        const char* vnext = pf_next ? vb + jn * vss + hn * vsh : nullptr;
        // Rows in groups of 4, then 2, then 1 (RG rows x 16/RG keys per reduction step).
        for (int64_t r0 = 0; r0 < R;) {
          const int64_t left = R - r0;
          const auto group = [&]<int RG>() {
            const int64_t idx0 = hk * R + r0;
            __m512 s[RG];
            scores_group<L, kDotRow, RG, kStreamKeys / RG>(s, qb + idx0 * Dp, Dp, kr, ks, D,
                                                           r0 == 0 ? knext : nullptr);
            float alpha[RG];
#pragma GCC unroll 4
            for (int r = 0; r < RG; ++r) {
              const int64_t idx = idx0 + r;
              __m512 sr = s[r];
              if constexpr (kDotRow) sr = _mm512_mul_ps(sr, _mm512_set1_ps(c2));
              sr = _mm512_mask_blend_ps(valid, ninf, sr);
              const float m_new = std::max(m[idx], hmax(sr));
              // No finite score yet (only -inf keys): exponents against 0, P = 0.
              const float mu = m_new == kNegInf ? 0.f : m_new;
              const __m512 e = exp2_ps(_mm512_sub_ps(sr, _mm512_set1_ps(mu)));
              alpha[r] = _mm512_cvtss_f32(exp2_ps(_mm512_set1_ps(m[idx] - mu)));
              l[idx] = l[idx] * alpha[r] + hsum(e);
              m[idx] = m_new;
              _mm512_storeu_ps(pb + r * kStreamKeys, e);
            }
            float* o = ob + idx0 * Dvp;
            constexpr int kMaxLoads =
                (RG >= 4 ? 4 : 8) / (L == StreamLoad::kBf16 ? 2 : 1);  // <= 16 accumulators
            for_each_vec_block<kMaxLoads>(vvecs, [&]<int NL>(int64_t x0) {
              pv_group<L, RG, NL>(o, Dvp, alpha, pb, vr, vs, nk, x0, Dv - (x0 + NL - 1) * W,
                                  r0 == 0 ? vnext : nullptr);
            });
          };
          if (left >= 4) {
            group.template operator()<4>();
            r0 += 4;
          } else if (left >= 2) {
            group.template operator()<2>();
            r0 += 2;
          } else {
            group.template operator()<1>();
            r0 += 1;
          }
        }
      }
      if (p.progress != nullptr && (j0 / kStreamKeys) % 64 == 63) p.progress(p.progress_ctx);
    }

    float* out = static_cast<float*>(p.out.data);
    float* lse = static_cast<float*>(p.lse.data);
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = r / g, h = hk * g + r % g;
        const int64_t idx = hk * R + r;
        const float* o = ob + idx * Dvp;
        float* dst = out + b * p.out.sb + i * p.out.ss + h * p.out.sh;
        const float inv = l[idx] > 0.f ? 1.f / l[idx] : 0.f;
        for (int64_t e = 0; e < Dv; ++e) dst[e] = o[L == StreamLoad::kBf16 ? pair_pos(e) : e] * inv;
        lse[b * p.lse.sb + h * p.lse.sh + i * p.lse.ss] =
            l[idx] > 0.f ? (m[idx] + std::log2(l[idx])) * kLn2 : kNegInf;
      }
  }
}

template <bool kDot>
void decode_stream_dispatch(const FlashForwardParams& p) {
  switch (p.k.dtype) {
    case DType::kBFloat16:
      // The dot-product scores need the query in bf16 too (q, k, v share a dtype).
      return decode_stream_impl<StreamLoad::kBf16, kDot>(p);
    case DType::kFloat16:
      return decode_stream_impl<StreamLoad::kF16, false>(p);
    default:
      return decode_stream_impl<StreamLoad::kF32, false>(p);
  }
}

}  // namespace
}  // namespace distattn::kernels::cpu
