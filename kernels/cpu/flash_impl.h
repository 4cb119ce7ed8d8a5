#pragma once
// The tiled online-softmax forward and the FlashAttention-2 style backward, written once
// against an instruction-set policy `Isa` that supplies the inner pieces:
//   Isa::gemm(M, N, K, a, ars, ats, b, ldb, c, ldc, accumulate)
//       c[m*ldc + n] (+)= sum_k a[m*ars + k*ats] * b[k*ldb + n]      (all fp32)
//   Isa::softmax_columns(st, ld, rows, cols, m, l, alpha)   forward online-softmax step on a
//       transposed score tile st[j*ld + i] (log2 domain), turns it into P^T in place
//   Isa::probs_rows(s, ld, rows, cols, c2, lse2)   s[i][j] <- exp2(s[i][j]*c2 - lse2[i])
// Included by exactly one portable and one AVX-512 translation unit; everything here has
// internal linkage so the two instantiations (compiled with different flags) never merge.
// Keep inline/template code with external linkage out of this file (no DISTATTN_CHECK, no
// std::string building): its weak copies from the AVX-512 unit could be the ones the linker
// keeps, and would then run on CPUs without AVX-512. Errors go through functions defined in
// the portable units (flash_scratch_alloc_failed).
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>

#include "distattn/core/half.h"
#include "kernels/cpu/flash_cpu.h"

namespace distattn::kernels::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// 64-byte aligned fp32 scratch.
struct FloatBuffer {
  float* ptr = nullptr;
  explicit FloatBuffer(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * 4 + 63) / 64 * 64;
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (ptr == nullptr) flash_scratch_alloc_failed(bytes);
  }
  ~FloatBuffer() { std::free(ptr); }
  FloatBuffer(const FloatBuffer&) = delete;
  FloatBuffer& operator=(const FloatBuffer&) = delete;
  float* get() const { return ptr; }
};

inline float load_scalar(const void* base, DType t, int64_t idx) {
  switch (t) {
    case DType::kBFloat16:
      return bf16_t::to_float(static_cast<const uint16_t*>(base)[idx]);
    case DType::kFloat16:
      return fp16_t::to_float(static_cast<const uint16_t*>(base)[idx]);
    default:
      return static_cast<const float*>(base)[idx];
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16-bit rows to fp32 with AVX-512 (this header is compiled with those flags only in the
// *_avx512.cpp units): bf16 is the top half of an fp32, fp16 goes through vcvtph2ps.
inline void load_row_16bit(const uint16_t* s, bool is_bf16, int64_t n, float* dst, float mul) {
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t x = 0; x < n; x += 16) {
    const __mmask16 mk =
        n - x >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - x)) - 1u);
    const __m256i h = _mm256_maskz_loadu_epi16(mk, s + x);
    const __m512 f = is_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                             : _mm512_cvtph_ps(h);
    _mm512_mask_storeu_ps(dst + x, mk, _mm512_mul_ps(f, vm));
  }
}
#elif defined(__AVX2__) && defined(__F16C__)
// Same with AVX2 + F16C (the *_avx2.cpp units), 8 values at a time, scalar tail.
inline void load_row_16bit(const uint16_t* s, bool is_bf16, int64_t n, float* dst, float mul) {
  const __m256 vm = _mm256_set1_ps(mul);
  int64_t x = 0;
  for (; x + 8 <= n; x += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + x));
    const __m256 f = is_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                             : _mm256_cvtph_ps(h);
    _mm256_storeu_ps(dst + x, _mm256_mul_ps(f, vm));
  }
  for (; x < n; ++x) dst[x] = (is_bf16 ? bf16_t::to_float(s[x]) : fp16_t::to_float(s[x])) * mul;
}
#endif

// dst[0..n) = src[0..n) * mul, converting from the storage dtype.
inline void load_row(const void* src, DType t, int64_t n, float* dst, float mul = 1.f) {
#if (defined(__AVX512F__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__F16C__))
  if (t != DType::kFloat32) {
    load_row_16bit(static_cast<const uint16_t*>(src), t == DType::kBFloat16, n, dst, mul);
    return;
  }
#endif
  if (t == DType::kFloat32) {
    const float* s = static_cast<const float*>(src);
    for (int64_t x = 0; x < n; ++x) dst[x] = s[x] * mul;
  } else if (t == DType::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t x = 0; x < n; ++x) {
      const uint32_t u = static_cast<uint32_t>(s[x]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      dst[x] = f * mul;
    }
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t x = 0; x < n; ++x) dst[x] = fp16_t::to_float(s[x]) * mul;
  }
}

// dst (storage dtype) = src * mul, or dst += src * mul when accumulate.
inline void store_row(const float* src, int64_t n, void* dst, DType t, bool accumulate,
                      float mul = 1.f) {
  if (t == DType::kFloat32) {
    float* d = static_cast<float*>(dst);
    if (accumulate) {
      for (int64_t x = 0; x < n; ++x) d[x] += src[x] * mul;
    } else {
      for (int64_t x = 0; x < n; ++x) d[x] = src[x] * mul;
    }
  } else if (t == DType::kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t x = 0; x < n; ++x) {
      const float base = accumulate ? bf16_t::to_float(d[x]) : 0.f;
      d[x] = bf16_t::from_float(base + src[x] * mul);
    }
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t x = 0; x < n; ++x) {
      const float base = accumulate ? fp16_t::to_float(d[x]) : 0.f;
      d[x] = fp16_t::from_float(base + src[x] * mul);
    }
  }
}

inline char* byte_ptr(void* base, DType t, int64_t elem_offset) {
  return static_cast<char*>(base) + elem_offset * static_cast<int64_t>(dtype_size(t));
}

// fp32 rows [rows][cols] of an operand starting at element `offset`, row stride `ld`
// elements: the operand itself when it is fp32 (no copy), else converted into `scratch`.
struct Rows {
  const float* ptr;
  int64_t ld;
};
inline Rows fp32_rows(const FlashOperand& op, int64_t offset, int64_t ld, int64_t rows,
                      int64_t cols, float* scratch) {
  if (op.dtype == DType::kFloat32) return {static_cast<const float*>(op.data) + offset, ld};
  for (int64_t r = 0; r < rows; ++r)
    load_row(byte_ptr(op.data, op.dtype, offset + r * ld), op.dtype, cols, scratch + r * cols);
  return {scratch, cols};
}

// The same rows always copied into `scratch` with row stride `lds` (any dtype): a GEMM's B
// panel read from a [S, H, D] operand has rows whole kilobytes apart, which share a few L1
// sets; a padded stride (padded_ld) spreads them.
inline Rows fp32_rows_copy(const FlashOperand& op, int64_t offset, int64_t ld, int64_t rows,
                           int64_t cols, float* scratch, int64_t lds) {
  for (int64_t r = 0; r < rows; ++r)
    load_row(byte_ptr(op.data, op.dtype, offset + r * ld), op.dtype, cols, scratch + r * lds);
  return {scratch, lds};
}
// `rows` rows of n 16-bit values of an operand from element `offset` on (row stride op.ss),
// copied into dst with row stride n.
inline void rows16_copy(const FlashOperand& op, int64_t offset, int64_t rows, int64_t n,
                        uint16_t* dst) {
  const auto* src = static_cast<const uint16_t*>(op.data) + offset;
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * n, src + r * op.ss, static_cast<size_t>(n) * 2);
}
// A row stride of >= n floats: an odd number of 64-byte lines, so that successive rows
// fall in different L1 sets.
constexpr int64_t padded_ld(int64_t n) {
  const int64_t lines = (n + 15) / 16;
  return (lines % 2 == 0 ? lines + 1 : lines) * 16;
}

// Key j (global k_offset+j) is visible to query i (global q_offset+i) iff
// lo(qpos) <= kpos <= hi(qpos); lo and hi are nondecreasing in qpos.
struct Mask {
  bool causal;
  int64_t wl, wr, q_offset, k_offset;
  static constexpr int64_t kFar = std::numeric_limits<int64_t>::max() / 4;

  int64_t lo(int64_t qpos) const { return wl >= 0 ? qpos - wl : -kFar; }
  int64_t hi(int64_t qpos) const {
    int64_t h = kFar;
    if (causal) h = qpos;
    if (wr >= 0) h = std::min(h, qpos + wr);
    return h;
  }
  enum Kind { kSkip, kFull, kPartial };
  // Queries [i0, i1) x keys [j0, j1), both non-empty.
  Kind classify(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    const int64_t qa = q_offset + i0, qb = q_offset + i1 - 1;
    const int64_t ka = k_offset + j0, kb = k_offset + j1 - 1;
    if (hi(qb) < ka || lo(qa) > kb) return kSkip;
    if (lo(qb) <= ka && hi(qa) >= kb) return kFull;
    return kPartial;
  }
  // Smallest / largest query position that sees key position kpos (range may be empty).
  int64_t first_query(int64_t kpos) const {
    int64_t q = -kFar;
    if (causal) q = std::max(q, kpos);
    if (wr >= 0) q = std::max(q, kpos - wr);
    return q;
  }
  int64_t last_query(int64_t kpos) const { return wl >= 0 ? kpos + wl : kFar; }

  // Masks a score tile of queries [i0, i0+bq) x keys [j0, j0+bk) to -inf where invisible.
  // Visible sets are intervals along both axes, so each line is two fills.
  // Transposed layout st[j*ld + i] (forward):
  void apply_transposed(float* st, int64_t ld, int64_t i0, int64_t bq, int64_t j0,
                        int64_t bk) const {
    for (int64_t j = 0; j < bk; ++j) {
      const int64_t kp = k_offset + j0 + j;
      const int64_t a = std::clamp<int64_t>(first_query(kp) - q_offset - i0, 0, bq);
      const int64_t z = std::clamp<int64_t>(last_query(kp) - q_offset - i0 + 1, a, bq);
      float* r = st + j * ld;
      std::fill(r, r + a, -std::numeric_limits<float>::infinity());
      std::fill(r + z, r + bq, -std::numeric_limits<float>::infinity());
    }
  }
  // Row layout s[i*ld + j] (backward):
  void apply_rows(float* s, int64_t ld, int64_t i0, int64_t bq, int64_t j0, int64_t bk) const {
    for (int64_t i = 0; i < bq; ++i) {
      const int64_t qp = q_offset + i0 + i;
      const int64_t a = std::clamp<int64_t>(lo(qp) - k_offset - j0, 0, bk);
      const int64_t z = std::clamp<int64_t>(hi(qp) - k_offset - j0 + 1, a, bk);
      float* r = s + i * ld;
      std::fill(r, r + a, -std::numeric_limits<float>::infinity());
      std::fill(r + z, r + bk, -std::numeric_limits<float>::infinity());
    }
  }
};

inline Mask make_mask(const FlashForwardParams& p) {
  return Mask{p.causal, p.window_left, p.window_right, p.q_offset, p.k_offset};
}

// Operands the forward and backward pack once per call for all their items (see there)
// take at most this much extra memory; larger calls pack per tile.
constexpr int64_t kPrepackBytes = int64_t{512} << 20;

// Small problems run on the calling thread: a thread team's start and barriers cost more
// than the work (and much more when cores are oversubscribed and waiting threads spin).
constexpr int64_t kMinParallelMacs = int64_t{1} << 21;
constexpr int64_t kMinParallelElems = int64_t{1} << 16;

// Calls the progress hook every `every` ticks, only from the calling team's thread 0.
struct ProgressTicker {
  void (*fn)(void*);
  void* ctx;
  bool master;
  int every;
  int count = 0;
  void tick() {
    if (fn != nullptr && master && ++count >= every) {
      count = 0;
      fn(ctx);
    }
  }
  // Unconditional call (thread 0 only): at entry and exit of each parallel loop, so the
  // hook runs even when thread 0 got no tile (e.g. descheduled on a busy machine).
  void now() {
    if (fn != nullptr && master) {
      count = 0;
      fn(ctx);
    }
  }
};

// Policies with bf16 dot-product tiles (AVX512-BF16: gemm_bf16, pack_q, pack_v, pack_p)
// declare kBf16Dot; the forward takes them when q, k and v are bf16 and D is even.
template <class Isa>
constexpr bool kHasBf16Dot = requires {
  Isa::kBf16Dot;
};
// Policies whose bf16 P V product wants P row by row, pairs along the keys (AMX tiles load
// that in place) fuse the softmax with the packing of P (flash_isa_amx.h):
//   Isa::softmax_pack_rows(st, ld, rows, cols, scale, m, l, alpha, pw, pw_lo, ldw)
template <class Isa>
constexpr bool kSoftmaxPacksRows = requires {
  &Isa::softmax_pack_rows;
};
// prefetcht0 of every cache line of `rows` rows of `row_bytes` bytes, ld_bytes apart. An asm
// statement: with __builtin_prefetch, GCC 12 -O3 compiled the whole loop away in
// flash_forward_avx2.cpp.
inline void prefetch_rows_t0(const char* base, int64_t ld_bytes, int64_t rows, int64_t row_bytes) {
#if defined(__x86_64__)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < row_bytes; c += 64)
      asm volatile("prefetcht0 %0" : : "m"(*(base + r * ld_bytes + c)));
#else
  (void)base, (void)ld_bytes, (void)rows, (void)row_bytes;
#endif
}
// Policies that prefetch the fp32 forward's next K and V tiles (flash_isa_avx2.h):
//   Isa::prefetch_rows(base, ld_bytes, rows, row_bytes)
template <class Isa>
constexpr bool kPrefetchTiles = requires {
  &Isa::prefetch_rows;
};
// `rows` rows of `width` elements of `op` from element `off` on, into the cache (a tile that
// the next step reads); nothing for policies without prefetch_rows.
template <class Isa>
inline void prefetch_tile(const FlashOperand& op, int64_t off, int64_t rows, int64_t width) {
  if constexpr (kPrefetchTiles<Isa>) {
    const int64_t es = dtype_size(op.dtype);
    if (rows > 0)
      Isa::prefetch_rows(static_cast<const char*>(op.data) + off * es, op.ss * es, rows,
                         width * es);
  }
}

// ---------------------------------------------------------------------------------------
// Forward. Work item = (batch, query head, block of <= kBq queries); K/V tiles of kBk keys.
// Scores are computed transposed (st[j][i] = K Q^T with Q^T packed once per item, prescaled
// by scale*log2(e)), so the per-query softmax statistics are vertical, lane-parallel
// reductions; O += P V then broadcasts P^T entries against contiguous V rows.
template <class Isa>
void forward_impl(const FlashForwardParams& p) {
  constexpr int64_t kBq = Isa::kFwdBlockQ;
  constexpr int64_t kBk = Isa::kFwdBlockK;
  // Padded row strides (padded_ld) of the score tile st[j][i] (the softmax reads one column
  // block down all key rows, twice) and of the packed queries qt[d][i] (the B panel of the
  // scores, read down d for every block of keys), so that those rows spread over the L1 sets
  // instead of sharing a few.
  constexpr int64_t kLdS = padded_ld(kBq);
  constexpr int64_t kLdQ = padded_ld(kBq);
  const int64_t B = p.batch, Sq = p.seq_q, Sk = p.seq_k, Hq = p.heads_q, D = p.head_dim,
                Dv = p.head_dim_v;
  const int64_t group = Hq / p.heads_kv;
  // bf16 tiles: K is read as stored, Q, V and P are packed as bf16 pairs
  // (flash_isa_avx512bf16.h).
  bool bf16_dot = false;
  if constexpr (kHasBf16Dot<Isa>)
    bf16_dot = p.q.dtype == DType::kBFloat16 && p.k.dtype == DType::kBFloat16 &&
               p.v.dtype == DType::kBFloat16 && D % 2 == 0;
  // Query block: kBq, halved (down to 32) while that leaves threads without an item.
  const int64_t threads = omp_get_max_threads();
  int64_t qstep = kBq;
  while (qstep > 32 && B * Hq * ((Sq + qstep - 1) / qstep) < threads) qstep /= 2;
  const int64_t nqb = (Sq + qstep - 1) / qstep;
  const int64_t items = B * Hq * nqb;
  const float c2 = p.scale * kLog2e;
  const Mask mask = make_mask(p);
  float* lse_base = static_cast<float*>(p.lse.data);
  const bool parallel_main =
      items > 1 && static_cast<double>(B * Hq * Sq) * static_cast<double>(Sk * (D + Dv)) >=
                       static_cast<double>(kMinParallelMacs);
  const int64_t kb2 = (kBk + 1) / 2;  // key pairs of a tile
  // fp32 outputs carry P as bf16 hi + lo (two P V passes); bf16 outputs round P once.
  const bool p_split = bf16_dot && p.out.dtype != DType::kBFloat16;
  // P by rows (kSoftmaxPacksRows): pw[i*ldw + j2], the scale applied in the softmax (scores
  // stored unscaled; a positive scale keeps the mask's -inf).
  const int64_t ldw = (kb2 + 15) / 16 * 16;
  const int64_t ldv = padded_ld(Dv);  // fp32 V tile stride
  const bool p_rows = kSoftmaxPacksRows<Isa> && bf16_dot && c2 > 0.f;
  // With several query blocks per head, K and V are packed once per call for all items:
  // bf16 tiles: kpk[b][hk][j][D] (K as stored, rows contiguous) and vpk[b][hk][j/2][Dv]
  // (pack_v's layout for the whole sequence); fp32 tiles: both as fp32 rows, V with the
  // padded stride ldv. Every item then reads them contiguously instead of converting or
  // re-packing its tiles and striding across heads (rows H*D apart, a page each: loads that
  // miss to L3 without the hardware prefetcher's help). Extra memory: this call's K and V
  // once more, up to kPrepackBytes; above that, per tile as before.
  const int64_t Hkv = p.heads_kv, Sk2 = (Sk + 1) / 2;
  const int64_t kpk_floats = bf16_dot ? Sk * D / 2 : Sk * D;
  const int64_t vpk_floats = bf16_dot ? Sk2 * Dv : Sk * ldv;
  const bool prepack = nqb > 1 && B * Hkv * (kpk_floats + vpk_floats) * 4 <= kPrepackBytes;
  FloatBuffer kpk(prepack ? B * Hkv * kpk_floats : 0), vpk(prepack ? B * Hkv * vpk_floats : 0);
  if (prepack) {
    const int64_t chunks = (Sk + kBk - 1) / kBk;
#pragma omp parallel for schedule(static) if (parallel_main)
    for (int64_t x = 0; x < B * Hkv * chunks; ++x) {
      const int64_t c0 = x % chunks * kBk, bh = x / chunks, hk = bh % Hkv, b = bh / Hkv;
      const int64_t rows = std::min(kBk, Sk - c0);
      const int64_t koff = b * p.k.sb + hk * p.k.sh, voff = b * p.v.sb + c0 * p.v.ss + hk * p.v.sh;
      if (bf16_dot) {
        if constexpr (kHasBf16Dot<Isa>) {
          rows16_copy(p.k, koff + c0 * p.k.ss, rows, D,
                      reinterpret_cast<uint16_t*>(kpk.get()) + (bh * Sk + c0) * D);
          Isa::pack_v(static_cast<const uint16_t*>(p.v.data) + voff, p.v.ss, rows, Dv,
                      reinterpret_cast<uint32_t*>(vpk.get()) + (bh * Sk2 + c0 / 2) * Dv);
        }
      } else {
        fp32_rows_copy(p.k, koff + c0 * p.k.ss, p.k.ss, rows, D, kpk.get() + (bh * Sk + c0) * D, D);
        fp32_rows_copy(p.v, voff, p.v.ss, rows, Dv, vpk.get() + (bh * Sk + c0) * ldv, ldv);
      }
    }
  }

#pragma omp parallel if (parallel_main)
  {
    // fp32 tiles (qt, kbuf, vbuf) or bf16-pair tiles (qt holds qp, kbuf pp, vbuf vp).
    FloatBuffer qt(bf16_dot ? D / 2 * kLdQ : D * kLdQ), st(kBk * kLdS), o(kBq * Dv),
        kbuf(bf16_dot ? 2 * std::max(ldw * kBq, kb2 * kLdS) : kBk * D),
        vbuf(bf16_dot ? kb2 * Dv : kBk * ldv), stats(3 * kBq), row(std::max(D, Dv));
    float* m = stats.get();
    float* l = m + kBq;
    float* alpha = l + kBq;
    ProgressTicker progress{p.progress, p.progress_ctx, omp_get_thread_num() == 0, 2};

    progress.now();
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < items; ++item) {
      // Last query blocks first: under causal masks they carry the most keys.
      const int64_t qb = nqb - 1 - item % nqb;
      const int64_t h = (item / nqb) % Hq;
      const int64_t b = item / (nqb * Hq);
      const int64_t hk = h / group;
      const int64_t i0 = qb * qstep;
      const int64_t bq = std::min(qstep, Sq - i0);

      if (bf16_dot) {
        if constexpr (kHasBf16Dot<Isa>)
          Isa::pack_q(
              static_cast<const uint16_t*>(p.q.data) + b * p.q.sb + i0 * p.q.ss + h * p.q.sh,
              p.q.ss, bq, D, reinterpret_cast<uint32_t*>(qt.get()), kLdQ);
      } else {
        for (int64_t i = 0; i < bq; ++i) {
          const int64_t off = b * p.q.sb + (i0 + i) * p.q.ss + h * p.q.sh;
          load_row(byte_ptr(p.q.data, p.q.dtype, off), p.q.dtype, D, row.get(), c2);
          for (int64_t d = 0; d < D; ++d) qt.get()[d * kLdQ + i] = row.get()[d];
        }
      }
      for (int64_t i = 0; i < bq; ++i) {
        m[i] = kNegInf;
        l[i] = 0.f;
      }
      std::fill(o.get(), o.get() + bq * Dv, 0.f);

      // Keys that can be visible to some query of the block.
      const int64_t jlo = std::max<int64_t>(0, mask.lo(p.q_offset + i0) - p.k_offset);
      const int64_t jhi = std::min<int64_t>(Sk, mask.hi(p.q_offset + i0 + bq - 1) - p.k_offset + 1);
      for (int64_t j0 = jlo; j0 < jhi; j0 += kBk) {
        const int64_t bk = std::min(kBk, jhi - j0);
        const Mask::Kind kind = mask.classify(i0, i0 + bq, j0, j0 + bk);
        if (kind == Mask::kSkip) continue;
        const int64_t koff = b * p.k.sb + j0 * p.k.ss + hk * p.k.sh;
        const int64_t voff = b * p.v.sb + j0 * p.v.ss + hk * p.v.sh;
        // Queries of the block that see some key of the tile: columns [ia, ia + nq) of the
        // tile, rounded out to multiples of 16 (a partial tile on a causal diagonal or a
        // window edge leaves the rest out; their m, l and o do not change).
        int64_t ia = 0, nq = bq;
        if (kind == Mask::kPartial) {
          const int64_t ka = p.k_offset + j0, kz = ka + bk - 1;
          ia = std::clamp<int64_t>(mask.first_query(ka) - p.q_offset - i0, 0, bq) / 16 * 16;
          const int64_t iz = std::clamp<int64_t>(mask.last_query(kz) - p.q_offset - i0 + 1, 0, bq);
          nq = std::min<int64_t>(bq, (iz + 15) / 16 * 16) - ia;
          if (nq <= 0) continue;
        }
        float* const sq = st.get() + ia;
        Rows vr{nullptr, 0};
        if (bf16_dot) {
          // st = c2 * K Q^T: the scale is applied to the fp32 scores, q stays as stored.
          if constexpr (kHasBf16Dot<Isa>) {
            const uint16_t* kp = static_cast<const uint16_t*>(p.k.data) + koff;
            int64_t kld = p.k.ss;
            if (prepack) {
              kp = reinterpret_cast<const uint16_t*>(kpk.get()) + ((b * Hkv + hk) * Sk + j0) * D;
              kld = D;
            }
            Isa::gemm_bf16(bk, nq, D / 2, kp, kld, 2,
                           reinterpret_cast<const uint32_t*>(qt.get()) + ia, kLdQ, sq, kLdS, false,
                           p_rows ? 1.f : c2);
          }
        } else {
          // K rows, and V (the B panel of P V) as a copy with a padded stride.
          Rows kr{nullptr, 0};
          if (prepack) {
            kr = Rows{kpk.get() + ((b * Hkv + hk) * Sk + j0) * D, D};
            vr = Rows{vpk.get() + ((b * Hkv + hk) * Sk + j0) * ldv, ldv};
          } else {
            kr = fp32_rows(p.k, koff, p.k.ss, bk, D, kbuf.get());
            vr = fp32_rows_copy(p.v, voff, p.v.ss, bk, Dv, vbuf.get(), ldv);
          }
          Isa::gemm(bk, nq, D, kr.ptr, kr.ld, 1, qt.get() + ia, kLdQ, sq, kLdS, false);
        }
        if (kind == Mask::kPartial) mask.apply_transposed(sq, kLdS, i0 + ia, nq, j0, bk);
        auto* const pw = reinterpret_cast<uint32_t*>(kbuf.get());
        if (p_rows) {
          if constexpr (kSoftmaxPacksRows<Isa>)
            Isa::softmax_pack_rows(sq, kLdS, bk, nq, c2, m + ia, l + ia, alpha + ia, pw,
                                   p_split ? pw + ldw * kBq : nullptr, ldw);
        } else {
          Isa::softmax_columns(sq, kLdS, bk, nq, m + ia, l + ia, alpha + ia);
        }
        for (int64_t i = ia; i < ia + nq; ++i) {
          const float a = alpha[i];
          if (a != 1.f) {
            float* orow = o.get() + i * Dv;
            for (int64_t d = 0; d < Dv; ++d) orow[d] *= a;
          }
        }
        float* const oq = o.get() + ia * Dv;
        if (bf16_dot) {
          // O += P V with P rounded to bf16 (the normalizer l keeps the fp32 P).
          if constexpr (kHasBf16Dot<Isa>) {
            // The prepacked pairs when this tile's pairs are the sequence's: j0 even, and an
            // odd tile only at the end (its last pair's zero half is padding, not a key).
            const uint32_t* vp = reinterpret_cast<uint32_t*>(vbuf.get());
            if (prepack && j0 % 2 == 0 && (bk % 2 == 0 || j0 + bk == Sk))
              vp = reinterpret_cast<const uint32_t*>(vpk.get()) +
                   ((b * Hkv + hk) * Sk2 + j0 / 2) * Dv;
            else
              Isa::pack_v(static_cast<const uint16_t*>(p.v.data) + voff, p.v.ss, bk, Dv,
                          reinterpret_cast<uint32_t*>(vbuf.get()));
            // A(i, j2) of P: pw rows from 0 (p_rows) or the pairs pack_p lays along the
            // queries (with the stride of st), from column ia.
            const int64_t p_hi = p_rows ? ldw * kBq : kb2 * kLdS;
            const int64_t ars = p_rows ? 2 * ldw : 2, ats = p_rows ? 2 : 2 * kLdS;
            uint32_t* const pa = p_rows ? pw : pw + ia;
            if (!p_rows) Isa::pack_p(sq, kLdS, bk, nq, pa, p_split ? pa + p_hi : nullptr);
            for (int pass = 0; pass < (p_split ? 2 : 1); ++pass)
              Isa::gemm_bf16(nq, Dv, (bk + 1) / 2,
                             reinterpret_cast<const uint16_t*>(pa + pass * p_hi), ars, ats, vp, Dv,
                             oq, Dv, true, 1.f);
          }
        } else {
          // The next tile's K during this P V, its V after it (kPrefetchTiles policies).
          const int64_t next_rows = std::min(kBk, jhi - j0 - kBk);
          prefetch_tile<Isa>(p.k, koff + kBk * p.k.ss, next_rows, D);
          Isa::gemm(nq, Dv, bk, sq, 1, kLdS, vr.ptr, vr.ld, oq, Dv, true);
          prefetch_tile<Isa>(p.v, voff + kBk * p.v.ss, next_rows, Dv);
        }
        progress.tick();
      }

      for (int64_t i = 0; i < bq; ++i) {
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        const int64_t off = b * p.out.sb + (i0 + i) * p.out.ss + h * p.out.sh;
        store_row(o.get() + i * Dv, Dv, byte_ptr(p.out.data, p.out.dtype, off), p.out.dtype, false,
                  inv);
        lse_base[b * p.lse.sb + h * p.lse.sh + (i0 + i) * p.lse.ss] =
            l[i] > 0.f ? (m[i] + std::log2(l[i])) * kLn2 : kNegInf;
      }
      progress.tick();
    }
    progress.now();
  }
}

// ---------------------------------------------------------------------------------------
// Backward. A pre-pass computes delta = rowsum(dout * out) and lse in log2 units. Work item
// = (batch, KV head, chunk of key blocks): dK/dV of a key block are owned by one item
// (summed over the group's query heads there), so they need no atomics; dQ goes to an fp32
// scratch with one slice per key chunk (one chunk when there are enough (batch, KV head)
// pairs to keep every thread busy), reduced into dq at the end.
template <class Isa>
void backward_impl(const FlashBackwardParams& p) {
  constexpr int64_t kBq = Isa::kBwdBlockQ;
  constexpr int64_t kBk = Isa::kBwdBlockK;
  const int64_t B = p.batch, Sq = p.seq_q, Sk = p.seq_k, Hq = p.heads_q, Hkv = p.heads_kv,
                D = p.head_dim, Dv = p.head_dim_v;
  const int64_t group = Hq / Hkv;
  const float c2 = p.scale * kLog2e;
  const Mask mask = make_mask(p);
  const int64_t rows = B * Hq * Sq;
  const bool parallel_rows = rows * std::max(D, Dv) >= kMinParallelElems;
  const bool parallel_main =
      static_cast<double>(B * Hq * Sq) * static_cast<double>(Sk * (D + Dv)) >=
      static_cast<double>(kMinParallelMacs);

  // delta[(b*Hq + h)*Sq + i], lse2 likewise (+inf marks a fully masked row: P = 0 there).
  FloatBuffer delta(rows), lse2(rows);
  const float* lse_base = static_cast<const float*>(p.lse.data);
#pragma omp parallel if (parallel_rows)
  {
    FloatBuffer ro(Dv), rd(Dv);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r % Sq, h = (r / Sq) % Hq, b = r / (Sq * Hq);
      load_row(byte_ptr(p.out.data, p.out.dtype, b * p.out.sb + i * p.out.ss + h * p.out.sh),
               p.out.dtype, Dv, ro.get());
      load_row(byte_ptr(p.dout.data, p.dout.dtype, b * p.dout.sb + i * p.dout.ss + h * p.dout.sh),
               p.dout.dtype, Dv, rd.get());
      float acc = 0.f;
      for (int64_t d = 0; d < Dv; ++d) acc += ro.get()[d] * rd.get()[d];
      delta.get()[r] = acc;
      const float lv = lse_base[b * p.lse.sb + h * p.lse.sh + i * p.lse.ss];
      lse2.get()[r] = lv == kNegInf ? kPosInf : lv * kLog2e;
    }
  }

  const int64_t nkb = (Sk + kBk - 1) / kBk;
  const int64_t pairs = B * Hkv;
  const int64_t threads = parallel_main ? omp_get_max_threads() : 1;
  int64_t chunks = 1;
  if (pairs < 2 * threads && nkb > 1) chunks = std::min(nkb, (2 * threads + pairs - 1) / pairs);
  // Each extra chunk costs an fp32 copy of dq: keep the scratch within kDqScratchBytes (or
  // one copy), trading parallelism for memory when dq is huge (e.g. MQA at long context).
  constexpr int64_t kDqScratchBytes = int64_t{1} << 30;
  const int64_t dq_bytes = std::max<int64_t>(1, B * Hq * Sq * D * 4);
  chunks = std::max<int64_t>(1, std::min(chunks, kDqScratchBytes / dq_bytes));
  // With one chunk and an fp32 dq, each dq row is written by one item only: accumulate into
  // dq itself. Otherwise into an fp32 scratch [chunk][b][h][i][D], reduced at the end.
  const bool dq_direct = chunks == 1 && p.dq.dtype == DType::kFloat32;
  const int64_t dq_slice = B * Hq * Sq * D;
  FloatBuffer dqs(dq_direct ? 0 : chunks * dq_slice);
  float* const dq_f32 = static_cast<float*>(p.dq.data);
  if (dq_direct) {
    if (!p.accumulate) {
#pragma omp parallel for schedule(static) if (parallel_rows)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r % Sq, h = (r / Sq) % Hq, b = r / (Sq * Hq);
        float* d = dq_f32 + b * p.dq.sb + i * p.dq.ss + h * p.dq.sh;
        std::fill(d, d + D, 0.f);
      }
    }
  } else {
#pragma omp parallel for schedule(static) if (parallel_rows)
    for (int64_t x = 0; x < chunks * rows; ++x)
      std::fill(dqs.get() + x * D, dqs.get() + (x + 1) * D, 0.f);
  }

  // bf16 tiles (q, k, v, dout bf16; D, Dv even): the five GEMMs run on vdpbf16ps. Q, dO, K
  // and V are read as stored or packed as bf16 pairs; P and dS are rounded to bf16 (as the
  // GPU kernels do) when every gradient is bf16, else carried as hi + lo (a second pass of
  // the GEMMs that read them), so fp32 gradients keep fp32 accuracy.
  bool bf16_dot = false;
  if constexpr (kHasBf16Dot<Isa>)
    bf16_dot = p.q.dtype == DType::kBFloat16 && p.k.dtype == DType::kBFloat16 &&
               p.v.dtype == DType::kBFloat16 && p.dout.dtype == DType::kBFloat16 && D % 2 == 0 &&
               Dv % 2 == 0;
  const bool split = bf16_dot && (p.dq.dtype != DType::kBFloat16 ||
                                  p.dk.dtype != DType::kBFloat16 || p.dv.dtype != DType::kBFloat16);
  const int64_t kq2 = (kBq + 1) / 2, kk2 = (kBk + 1) / 2;  // query / key pairs of a block
  // fp32 tiles: K^T, V^T (kt, vt) and the K, Q, dO rows (kbuf, qbuf, dobuf; copies even of
  // fp32 operands) with padded strides, so that the GEMMs' B panels spread over the L1 sets.
  const int64_t ldt = bf16_dot ? kBk : padded_ld(kBk);
  const int64_t ldk = bf16_dot ? D : padded_ld(D), ldo = bf16_dot ? Dv : padded_ld(Dv);

  // With several key blocks per (batch, KV head), Q and dO are packed once per call, as the
  // forward packs K and V. bf16 tiles: rows as stored, contiguous (the A of S = Q K^T and
  // dP = dO V^T), then pairs along the queries (pack_v's layout, the B of dK and dV); fp32
  // tiles: rows with the padded strides ldk, ldo. Per (b, h): q_floats, do_floats.
  const int64_t Sq2 = (Sq + 1) / 2;
  const int64_t q_floats = bf16_dot ? Sq * D / 2 + Sq2 * D : Sq * ldk;
  const int64_t do_floats = bf16_dot ? Sq * Dv / 2 + Sq2 * Dv : Sq * ldo;
  const bool prepack = nkb > 1 && B * Hq * (q_floats + do_floats) * 4 <= kPrepackBytes;
  FloatBuffer qpk(prepack ? B * Hq * q_floats : 0), dopk(prepack ? B * Hq * do_floats : 0);
  if (prepack) {
    const int64_t qchunks = (Sq + kBq - 1) / kBq;
#pragma omp parallel for schedule(static) if (parallel_main)
    for (int64_t x = 0; x < B * Hq * qchunks; ++x) {
      const int64_t c0 = x % qchunks * kBq, bh = x / qchunks, h = bh % Hq, b = bh / Hq;
      const int64_t rows = std::min(kBq, Sq - c0);
      const int64_t qoff = b * p.q.sb + c0 * p.q.ss + h * p.q.sh;
      const int64_t dooff = b * p.dout.sb + c0 * p.dout.ss + h * p.dout.sh;
      float* const qd = qpk.get() + bh * q_floats;
      float* const dod = dopk.get() + bh * do_floats;
      if (bf16_dot) {
        if constexpr (kHasBf16Dot<Isa>) {
          const auto rows_and_pairs = [&](const FlashOperand& op, int64_t off, int64_t n,
                                          float* dst) {
            rows16_copy(op, off, rows, n, reinterpret_cast<uint16_t*>(dst) + c0 * n);
            Isa::pack_v(static_cast<const uint16_t*>(op.data) + off, op.ss, rows, n,
                        reinterpret_cast<uint32_t*>(dst + Sq * n / 2) + c0 / 2 * n);
          };
          rows_and_pairs(p.q, qoff, D, qd);
          rows_and_pairs(p.dout, dooff, Dv, dod);
        }
      } else {
        fp32_rows_copy(p.q, qoff, p.q.ss, rows, D, qd + c0 * ldk, ldk);
        fp32_rows_copy(p.dout, dooff, p.dout.ss, rows, Dv, dod + c0 * ldo, ldo);
      }
    }
  }

#pragma omp parallel if (parallel_main)
  {
    // fp32 tiles, or in bf16 mode: kt holds K packed as pairs along d (B of S = Q K^T), vt V
    // likewise (B of dP = dO V^T), kbuf K as pairs along keys (B of dQ = dS K), qbuf and
    // dobuf Q and dO as pairs along queries (B of dK = dS^T Q, dV = P^T dO); pw and dsw hold
    // P and dS as pairs along queries (A of dV, dK), dsr dS as pairs along keys (A of dQ),
    // each with its lo half after the hi half.
    FloatBuffer kt(D * ldt), vt(Dv * ldt), kbuf(kBk * ldk), vbuf(bf16_dot ? 0 : kBk * Dv),
        dk_acc(kBk * D), dv_acc(kBk * Dv), qbuf(kBq * ldk), dobuf(kBq * ldo), s(kBq * kBk),
        dp(kBq * kBk), pw(bf16_dot ? 2 * kq2 * kBk : 0), dsw(bf16_dot ? 2 * kq2 * kBk : 0),
        dsr(bf16_dot ? 2 * kBq * kk2 : 0);
    auto* const kt_w = reinterpret_cast<uint32_t*>(kt.get());
    auto* const vt_w = reinterpret_cast<uint32_t*>(vt.get());
    auto* const kv_w = reinterpret_cast<uint32_t*>(kbuf.get());
    auto* const qv_w = reinterpret_cast<uint32_t*>(qbuf.get());
    auto* const dov_w = reinterpret_cast<uint32_t*>(dobuf.get());
    auto* const pw_w = reinterpret_cast<uint32_t*>(pw.get());
    auto* const dsw_w = reinterpret_cast<uint32_t*>(dsw.get());
    auto* const dsr_w = reinterpret_cast<uint32_t*>(dsr.get());
    const auto u16 = [](const FlashOperand& op, int64_t off) {
      return static_cast<const uint16_t*>(op.data) + off;
    };
    ProgressTicker progress{p.progress, p.progress_ctx, omp_get_thread_num() == 0, 2};

    progress.now();
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < pairs * chunks; ++item) {
      const int64_t c = item % chunks;
      const int64_t hk = (item / chunks) % Hkv;
      const int64_t b = item / (chunks * Hkv);
      const int64_t kb_begin = c * nkb / chunks, kb_end = (c + 1) * nkb / chunks;
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * kBk;
        const int64_t bk = std::min(kBk, Sk - j0);
        const int64_t koff = b * p.k.sb + j0 * p.k.ss + hk * p.k.sh;
        const int64_t voff = b * p.v.sb + j0 * p.v.ss + hk * p.v.sh;
        Rows kr{nullptr, 0};
        if (bf16_dot) {
          if constexpr (kHasBf16Dot<Isa>) {
            Isa::pack_q(u16(p.k, koff), p.k.ss, bk, D, kt_w, kBk);
            Isa::pack_q(u16(p.v, voff), p.v.ss, bk, Dv, vt_w, kBk);
            Isa::pack_v(u16(p.k, koff), p.k.ss, bk, D, kv_w);
          }
        } else {
          kr = fp32_rows_copy(p.k, koff, p.k.ss, bk, D, kbuf.get(), ldk);
          const Rows vr = fp32_rows(p.v, voff, p.v.ss, bk, Dv, vbuf.get());
          for (int64_t j = 0; j < bk; ++j) {
            for (int64_t d = 0; d < D; ++d) kt.get()[d * ldt + j] = kr.ptr[j * kr.ld + d];
            for (int64_t d = 0; d < Dv; ++d) vt.get()[d * ldt + j] = vr.ptr[j * vr.ld + d];
          }
        }
        std::fill(dk_acc.get(), dk_acc.get() + bk * D, 0.f);
        std::fill(dv_acc.get(), dv_acc.get() + bk * Dv, 0.f);

        // Queries that can see some key of the block: hi(qpos) >= first key and
        // lo(qpos) <= last key.
        const int64_t ka = p.k_offset + j0, kz = p.k_offset + j0 + bk - 1;
        const int64_t ilo = std::max<int64_t>(0, mask.first_query(ka) - p.q_offset);
        const int64_t ihi = std::min<int64_t>(Sq, mask.last_query(kz) - p.q_offset + 1);

        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t row0 = (b * Hq + h) * Sq;
          // dq rows of this head: direct (row stride dq.ss) or the chunk's scratch slice.
          float* const dq_rows =
              dq_direct ? dq_f32 + b * p.dq.sb + h * p.dq.sh : dqs.get() + c * dq_slice + row0 * D;
          const int64_t dq_ld = dq_direct ? p.dq.ss : D;
          for (int64_t i0 = ilo; i0 < ihi; i0 += kBq) {
            const int64_t bq = std::min(kBq, ihi - i0);
            const Mask::Kind kind = mask.classify(i0, i0 + bq, j0, j0 + bk);
            if (kind == Mask::kSkip) continue;
            const int64_t qoff = b * p.q.sb + i0 * p.q.ss + h * p.q.sh;
            const int64_t dooff = b * p.dout.sb + i0 * p.dout.ss + h * p.dout.sh;
            const int64_t bq2 = (bq + 1) / 2, bk2 = (bk + 1) / 2;
            // The prepacked rows of this head, and its prepacked pairs when they are this
            // block's: i0 even, and an odd block only at the end (as in the forward).
            const float* const qh = prepack ? qpk.get() + (b * Hq + h) * q_floats : nullptr;
            const float* const doh = prepack ? dopk.get() + (b * Hq + h) * do_floats : nullptr;
            const bool pairs = prepack && i0 % 2 == 0 && (bq % 2 == 0 || i0 + bq == Sq);
            Rows qr{nullptr, 0}, dor{nullptr, 0};
            if (bf16_dot) {
              if constexpr (kHasBf16Dot<Isa>) {
                const uint16_t* qa =
                    prepack ? reinterpret_cast<const uint16_t*>(qh) + i0 * D : u16(p.q, qoff);
                const uint16_t* doa =
                    prepack ? reinterpret_cast<const uint16_t*>(doh) + i0 * Dv : u16(p.dout, dooff);
                // S = Q K^T, P = exp2(S * scale*log2e - lse2); dP = dO V^T; dV += P^T dO.
                Isa::gemm_bf16(bq, bk, D / 2, qa, prepack ? D : p.q.ss, 2, kt_w, kBk, s.get(), kBk,
                               false, 1.f);
                if (kind == Mask::kPartial) mask.apply_rows(s.get(), kBk, i0, bq, j0, bk);
                Isa::probs_rows(s.get(), kBk, bq, bk, c2, lse2.get() + row0 + i0);
                Isa::gemm_bf16(bq, bk, Dv / 2, doa, prepack ? Dv : p.dout.ss, 2, vt_w, kBk,
                               dp.get(), kBk, false, 1.f);
                Isa::pack_p(s.get(), kBk, bq, bk, pw_w, split ? pw_w + kq2 * kBk : nullptr);
                const uint32_t* dov = dov_w;
                if (pairs)
                  dov = reinterpret_cast<const uint32_t*>(doh + Sq * Dv / 2) + i0 / 2 * Dv;
                else
                  Isa::pack_v(u16(p.dout, dooff), p.dout.ss, bq, Dv, dov_w);
                for (int pass = 0; pass < (split ? 2 : 1); ++pass)
                  Isa::gemm_bf16(bk, Dv, bq2,
                                 reinterpret_cast<const uint16_t*>(pw_w + pass * kq2 * kBk), 2,
                                 2 * kBk, dov, Dv, dv_acc.get(), Dv, true, 1.f);
              }
            } else {
              if (prepack) {
                qr = Rows{qh + i0 * ldk, ldk};
                dor = Rows{doh + i0 * ldo, ldo};
              } else {
                qr = fp32_rows_copy(p.q, qoff, p.q.ss, bq, D, qbuf.get(), ldk);
                dor = fp32_rows_copy(p.dout, dooff, p.dout.ss, bq, Dv, dobuf.get(), ldo);
              }
              // S = Q K^T, P = exp2(S * scale*log2e - lse2).
              Isa::gemm(bq, bk, D, qr.ptr, qr.ld, 1, kt.get(), ldt, s.get(), kBk, false);
              if (kind == Mask::kPartial) mask.apply_rows(s.get(), kBk, i0, bq, j0, bk);
              Isa::probs_rows(s.get(), kBk, bq, bk, c2, lse2.get() + row0 + i0);
              // dP = dO V^T; dV += P^T dO.
              Isa::gemm(bq, bk, Dv, dor.ptr, dor.ld, 1, vt.get(), ldt, dp.get(), kBk, false);
              Isa::gemm(bk, Dv, bq, s.get(), 1, kBk, dor.ptr, dor.ld, dv_acc.get(), Dv, true);
            }
            // dS = scale * P * (dP - delta), kept in dp.
            const float* drow = delta.get() + row0 + i0;
            for (int64_t i = 0; i < bq; ++i) {
              const float di = drow[i];
              const float* pr = s.get() + i * kBk;
              float* dr = dp.get() + i * kBk;
              for (int64_t j = 0; j < bk; ++j) dr[j] = p.scale * pr[j] * (dr[j] - di);
            }
            // dK += dS^T Q; dQ += dS K.
            if (bf16_dot) {
              if constexpr (kHasBf16Dot<Isa>) {
                Isa::pack_p(dp.get(), kBk, bq, bk, dsw_w, split ? dsw_w + kq2 * kBk : nullptr);
                const uint32_t* qv = qv_w;
                if (pairs)
                  qv = reinterpret_cast<const uint32_t*>(qh + Sq * D / 2) + i0 / 2 * D;
                else
                  Isa::pack_v(u16(p.q, qoff), p.q.ss, bq, D, qv_w);
                Isa::pack_rows(dp.get(), kBk, bq, bk, dsr_w, split ? dsr_w + kBq * kk2 : nullptr,
                               kk2);
                for (int pass = 0; pass < (split ? 2 : 1); ++pass) {
                  Isa::gemm_bf16(bk, D, bq2,
                                 reinterpret_cast<const uint16_t*>(dsw_w + pass * kq2 * kBk), 2,
                                 2 * kBk, qv, D, dk_acc.get(), D, true, 1.f);
                  Isa::gemm_bf16(bq, D, bk2,
                                 reinterpret_cast<const uint16_t*>(dsr_w + pass * kBq * kk2),
                                 2 * kk2, 2, kv_w, D, dq_rows + i0 * dq_ld, dq_ld, true, 1.f);
                }
              }
            } else {
              Isa::gemm(bk, D, bq, dp.get(), 1, kBk, qr.ptr, qr.ld, dk_acc.get(), D, true);
              Isa::gemm(bq, D, bk, dp.get(), kBk, 1, kr.ptr, kr.ld, dq_rows + i0 * dq_ld, dq_ld,
                        true);
            }
            progress.tick();
          }
        }
        for (int64_t j = 0; j < bk; ++j) {
          store_row(
              dk_acc.get() + j * D, D,
              byte_ptr(p.dk.data, p.dk.dtype, b * p.dk.sb + (j0 + j) * p.dk.ss + hk * p.dk.sh),
              p.dk.dtype, p.accumulate);
          store_row(
              dv_acc.get() + j * Dv, Dv,
              byte_ptr(p.dv.data, p.dv.dtype, b * p.dv.sb + (j0 + j) * p.dv.ss + hk * p.dv.sh),
              p.dv.dtype, p.accumulate);
        }
        progress.tick();
      }
    }
    progress.now();
  }

  if (dq_direct) return;
    // dq (+)= sum over chunks.
#pragma omp parallel for schedule(static) if (parallel_rows)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % Sq, h = (r / Sq) % Hq, b = r / (Sq * Hq);
    float* acc = dqs.get() + r * D;
    for (int64_t c = 1; c < chunks; ++c) {
      const float* part = dqs.get() + c * dq_slice + r * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += part[d];
    }
    store_row(acc, D, byte_ptr(p.dq.data, p.dq.dtype, b * p.dq.sb + i * p.dq.ss + h * p.dq.sh),
              p.dq.dtype, p.accumulate);
  }
}

// ---------------------------------------------------------------------------------------
// Portable policy: plain loops the compiler vectorizes for the baseline target.
struct PortableIsa {
  static constexpr int64_t kFwdBlockQ = 64;
  static constexpr int64_t kFwdBlockK = 64;
  static constexpr int64_t kBwdBlockQ = 64;
  static constexpr int64_t kBwdBlockK = 64;

  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t ats,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    for (int64_t m = 0; m < M; ++m) {
      float* cr = c + m * ldc;
      if (!accumulate) std::fill(cr, cr + N, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float av = a[m * ars + k * ats];
        const float* br = b + k * ldb;
        for (int64_t n = 0; n < N; ++n) cr[n] += av * br[n];
      }
    }
  }

  static void softmax_columns(float* st, int64_t ld, int64_t rows, int64_t cols, float* m, float* l,
                              float* alpha) {
    float mx[kFwdBlockQ], mu[kFwdBlockQ], sum[kFwdBlockQ];
    for (int64_t i = 0; i < cols; ++i) mx[i] = m[i];
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t i = 0; i < cols; ++i) mx[i] = std::max(mx[i], st[j * ld + i]);
    for (int64_t i = 0; i < cols; ++i) {
      // A column with no visible key so far keeps m = -inf; exponentiate against 0 there so
      // that -inf - -inf never makes a NaN.
      mu[i] = mx[i] == kNegInf ? 0.f : mx[i];
      alpha[i] = std::exp2(m[i] - mu[i]);
      m[i] = mx[i];
      sum[i] = 0.f;
    }
    for (int64_t j = 0; j < rows; ++j) {
      float* r = st + j * ld;
      for (int64_t i = 0; i < cols; ++i) {
        const float e = std::exp2(r[i] - mu[i]);
        r[i] = e;
        sum[i] += e;
      }
    }
    for (int64_t i = 0; i < cols; ++i) l[i] = l[i] * alpha[i] + sum[i];
  }

  static void probs_rows(float* s, int64_t ld, int64_t rows, int64_t cols, float c2,
                         const float* lse2) {
    for (int64_t i = 0; i < rows; ++i) {
      float* r = s + i * ld;
      const float sub = lse2[i];
      for (int64_t j = 0; j < cols; ++j) r[j] = std::exp2(r[j] * c2 - sub);
    }
  }
};

}  // namespace
}  // namespace distattn::kernels::cpu
