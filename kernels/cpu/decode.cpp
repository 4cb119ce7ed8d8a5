// Flash-decoding on the CPU: a decode step has too few queries to keep the cores busy
// through the query dimension, so the key range of every sequence is split into chunks, the
// (sequence, chunk) tasks run in parallel into fp32 partials (out, lse), and the partials
// are combined with the LSE merge. A chunk that every query sees in full goes through the
// streaming decode tiles (decode_stream_avx512.h: the query rows of a KV group together, keys
// in the vector lanes, each K/V byte read once) on the AVX-512 levels, else through
// flash_forward (GQA heads packed as rows, see run_chunk). The paged variant makes every run
// of consecutive pages of a sequence a chunk (a strided view into the page pools) and
// folds the runs of one task together with kernels::cpu::merge.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <vector>

#include "distattn/core/half.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/flash_cpu.h"

namespace distattn::kernels::cpu {

namespace {

// Keys per chunk below which splitting costs more (partials, merge) than it saves.
constexpr int64_t kMinChunkKeys = 256;

// Chunks per sequence when the caller leaves num_splits at 0: enough (batch x chunk) tasks
// for about two per thread, never chunks shorter than kMinChunkKeys.
int64_t auto_splits(int64_t batch, int64_t keys) {
  const int64_t threads = std::max(1, omp_get_max_threads());
  const int64_t want =
      std::max<int64_t>(1, (2 * threads + batch - 1) / std::max<int64_t>(batch, 1));
  return std::clamp<int64_t>(std::min(want, keys / kMinChunkKeys), 1, std::max<int64_t>(keys, 1));
}

void store(void* base, DType t, int64_t idx, float v) {
  switch (t) {
    case DType::kFloat32:
      static_cast<float*>(base)[idx] = v;
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[idx] = bf16_t::from_float(v);
      break;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[idx] = fp16_t::from_float(v);
      break;
    default:
      DISTATTN_THROW(Status::kInternal, "decode: unexpected output dtype ", dtype_name(t));
  }
}

// Partials of all tasks: out [B, G, Sq, Hq, Dv], lse [B, G, Hq, Sq], fp32 packed;
// sequence b uses its first count[b] slots.
struct Partials {
  int64_t B, G, Sq, Hq, Dv;
  Tensor out, lse;
  Partials(int64_t b, int64_t g, int64_t sq, int64_t hq, int64_t dv)
      : B(b), G(g), Sq(sq), Hq(hq), Dv(dv) {
    out = Tensor::empty({B * G, Sq, Hq, Dv}, DType::kFloat32);
    lse = Tensor::empty({B * G, Hq, Sq}, DType::kFloat32);
  }
  TensorView out_view(int64_t b, int64_t g) const { return out.view().slice(0, b * G + g, 1); }
  TensorView lse_view(int64_t b, int64_t g) const { return lse.view().slice(0, b * G + g, 1); }
};

// out/lse of sequence b <- LSE merge of its count[b] partials (none: fully masked).
void combine(const Partials& p, const std::vector<int64_t>& count, const TensorView& out,
             const TensorView& lse) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float* po = p.out.data_as<float>();
  const float* pl = p.lse.data_as<float>();
  const int64_t B = p.B, Sq = p.Sq, Hq = p.Hq, Dv = p.Dv, G = p.G;
#pragma omp parallel
  {
    std::vector<float> w(static_cast<size_t>(std::max<int64_t>(G, 1)));
    std::vector<float> acc(static_cast<size_t>(Dv));
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sq; ++i)
        for (int64_t h = 0; h < Hq; ++h) {
          const int64_t n = count[static_cast<size_t>(b)];
          float m = neg_inf;
          for (int64_t g = 0; g < n; ++g) m = std::max(m, pl[((b * G + g) * Hq + h) * Sq + i]);
          float total = 0;
          for (int64_t g = 0; g < n; ++g) {
            const float l = pl[((b * G + g) * Hq + h) * Sq + i];
            w[static_cast<size_t>(g)] = (m == neg_inf || l == neg_inf) ? 0.0f : std::exp(l - m);
            total += w[static_cast<size_t>(g)];
          }
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t g = 0; g < n; ++g) {
            if (w[static_cast<size_t>(g)] == 0.0f) continue;  // never read a masked partial
            const float wg = w[static_cast<size_t>(g)] / total;
            const float* src = po + (((b * G + g) * Sq + i) * Hq + h) * Dv;
            for (int64_t e = 0; e < Dv; ++e) acc[static_cast<size_t>(e)] += wg * src[e];
          }
          const int64_t orow = b * out.stride(0) + i * out.stride(1) + h * out.stride(2);
          for (int64_t e = 0; e < Dv; ++e)
            store(out.data, out.dtype, orow + e, acc[static_cast<size_t>(e)]);
          lse.data_as<float>()[b * lse.stride(0) + h * lse.stride(1) + i * lse.stride(2)] =
              total > 0 ? m + std::log(total) : neg_inf;
        }
  }
}

// True when every key position in [k0, k1) is visible to a query at qpos under o's mask.
bool all_visible(const ops::AttentionOptions& o, int64_t qpos, int64_t k0, int64_t k1) {
  if (o.causal && k1 - 1 > qpos) return false;
  if (o.window_left >= 0 && k0 < qpos - o.window_left) return false;
  if (o.window_right >= 0 && k1 - 1 > qpos + o.window_right) return false;
  return true;
}
bool none_visible(const ops::AttentionOptions& o, int64_t qpos, int64_t k0, int64_t k1) {
  if (o.causal && k0 > qpos) return true;
  if (o.window_left >= 0 && k1 - 1 < qpos - o.window_left) return true;
  if (o.window_right >= 0 && k0 > qpos + o.window_right) return true;
  return false;
}

// Key positions [lo, hi) where the mask of the queries at positions [q0, q1) can change:
// inside a piece between two consecutive cut points every query sees either all keys or
// none, except in the (short) pieces between the first and last query's bounds.
std::vector<int64_t> mask_cuts(const ops::AttentionOptions& o, int64_t q0, int64_t q1) {
  std::vector<int64_t> cuts;
  if (o.causal) {
    cuts.push_back(q0 + 1);  // keys <= q0 are seen by every query
    cuts.push_back(q1);      // keys >= q1 by none
  }
  if (o.window_left >= 0) {
    cuts.push_back(q0 - o.window_left);
    cuts.push_back(q1 - 1 - o.window_left);
  }
  if (o.window_right >= 0) {
    cuts.push_back(q0 + o.window_right + 1);
    cuts.push_back(q1 + o.window_right);
  }
  return cuts;
}

// [start, end) (chunk-local key indices, keys at global k_offset + index) cut at the global
// positions in `cuts`.
std::vector<std::pair<int64_t, int64_t>> split_at(int64_t start, int64_t end, int64_t k_offset,
                                                  const std::vector<int64_t>& cuts) {
  std::vector<int64_t> points{start, end};
  for (int64_t c : cuts)
    if (c - k_offset > start && c - k_offset < end) points.push_back(c - k_offset);
  std::sort(points.begin(), points.end());
  points.erase(std::unique(points.begin(), points.end()), points.end());
  std::vector<std::pair<int64_t, int64_t>> pieces;
  for (size_t p = 0; p + 1 < points.size(); ++p) pieces.emplace_back(points[p], points[p + 1]);
  return pieces;
}

// The streaming decode tiles on an unmasked chunk (see flash_cpu.h), when the instruction
// set has them; false leaves the chunk to flash_forward.
bool decode_stream(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& out, const TensorView& lse, const ops::AttentionOptions& o) {
  const CpuKernelIsa isa = active_cpu_kernel_isa();
  if (!is_avx512_level(isa)) return false;
  ops::AttentionOptions plain = o;
  plain.causal = false;
  plain.window_left = plain.window_right = -1;
  const FlashForwardParams p = make_forward_params(q, k, v, out, lse, plain);
#if DISTATTN_WITH_AVX512BF16
  if (is_avx512bf16_level(isa)) {
    decode_stream_avx512bf16(p);
    return true;
  }
#endif
#if DISTATTN_WITH_AVX512
  decode_stream_avx512(p);
  return true;
#else
  return false;
#endif
}

// One key chunk of one sequence: q [1, Sq, Hq, D], k/v [1, n, Hkv, D/Dv] (keys at global
// positions o.k_offset...), into fp32 out [1, Sq, Hq, Dv] and lse [1, Hq, Sq].
// The kernel's query tiles put queries in vector lanes, and decode has only Sq <= 16 queries
// per head. When every query sees the whole chunk (the common case once chunks are cut at
// mask_cuts), the mask cannot tell the Sq * g query rows of a KV group apart (g = Hq/Hkv), so
// they go together through the streaming decode tiles (up to kDecodeStreamMaxRows rows per
// KV head, keys in the vector lanes, each K/V byte read once), or, for more rows or
// without AVX-512, to flash_forward as rows of one head with no mask: keys are read once
// per group and the lanes fill up. Otherwise flash_forward runs on the chunk as it is.
void run_chunk(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const TensorView& lse, const ops::AttentionOptions& o) {
  const int64_t Sq = q.size(1), Hq = q.size(2), D = q.size(3), n = k.size(1), Hkv = k.size(2);
  const int64_t Dv = v.size(3), g = Hq / Hkv;
  const int64_t k0 = o.k_offset, k1 = o.k_offset + n;
  const int64_t q0 = o.q_offset, q1 = o.q_offset + Sq;
  bool all = true, none = true;
  for (int64_t qpos = q0; qpos < q1; ++qpos) {
    all = all && all_visible(o, qpos, k0, k1);
    none = none && none_visible(o, qpos, k0, k1);
  }
  if (none) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t h = 0; h < Hq; ++h) {
        std::fill_n(out.data_as<float>() + i * out.stride(1) + h * out.stride(2), Dv, 0.0f);
        lse.data_as<float>()[h * lse.stride(1) + i * lse.stride(2)] = neg_inf;
      }
    return;
  }
  if (all && g * Sq <= kDecodeStreamMaxRows && decode_stream(q, k, v, out, lse, o)) return;
  if (!all || g * Sq == 1) {  // mask cuts the chunk, or nothing to pack
    flash_forward(q, k, v, out, lse, o);
    return;
  }
  ops::AttentionOptions packed = o;
  packed.causal = false;
  packed.window_left = packed.window_right = -1;
  packed.softmax_scale = o.scale_for(D);
  const int64_t R = Sq * g;
  const int64_t qes = static_cast<int64_t>(q.element_size());
  // Rows r = i * g + t (query i, head hk * g + t), copied in q's dtype (kernels take q, k, v
  // of one dtype); results land in packed fp32 rows and are scattered back.
  std::vector<char> qbuf(static_cast<size_t>(R * D * qes));
  std::vector<float> obuf(static_cast<size_t>(R * Dv)), lbuf(static_cast<size_t>(R));
  const TensorView q_rows(qbuf.data(), q.dtype, q.device, {1, R, 1, D});
  const TensorView o_rows(obuf.data(), DType::kFloat32, out.device, {1, R, 1, Dv});
  const TensorView l_rows(lbuf.data(), DType::kFloat32, lse.device, {1, 1, R});
  const int64_t kes = static_cast<int64_t>(k.element_size());
  for (int64_t hk = 0; hk < Hkv; ++hk) {
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t t = 0; t < g; ++t)
        std::memcpy(
            qbuf.data() + (i * g + t) * D * qes,
            static_cast<const char*>(q.data) + (i * q.stride(1) + (hk * g + t) * q.stride(2)) * qes,
            static_cast<size_t>(D * qes));
    const int64_t shape_k[4] = {1, n, 1, D},
                  stride_k[4] = {k.stride(0), k.stride(1), k.stride(2), 1};
    const int64_t shape_v[4] = {1, n, 1, Dv},
                  stride_v[4] = {v.stride(0), v.stride(1), v.stride(2), 1};
    const TensorView kh(static_cast<char*>(k.data) + hk * k.stride(2) * kes, k.dtype, k.device,
                        shape_k, stride_k);
    const TensorView vh(static_cast<char*>(v.data) + hk * v.stride(2) * kes, v.dtype, v.device,
                        shape_v, stride_v);
    flash_forward(q_rows, kh, vh, o_rows, l_rows, packed);
    for (int64_t i = 0; i < Sq; ++i)
      for (int64_t t = 0; t < g; ++t) {
        const int64_t r = i * g + t, h = hk * g + t;
        std::copy_n(obuf.data() + r * Dv, Dv,
                    out.data_as<float>() + i * out.stride(1) + h * out.stride(2));
        lse.data_as<float>()[h * lse.stride(1) + i * lse.stride(2)] = lbuf[static_cast<size_t>(r)];
      }
  }
}

// Runs tasks 0..n-1 in parallel; only OpenMP thread 0 keeps the progress hook (the contract
// is: called from one thread, never concurrently). The first exception is rethrown.
template <typename Fn>
void run_tasks(int64_t n, const ops::AttentionOptions& opts, Fn&& fn) {
  std::exception_ptr error;
  std::mutex mu;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < n; ++t) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (error) continue;
    }
    ops::AttentionOptions o = opts;
    if (omp_get_thread_num() != 0) {
      o.progress = nullptr;
      o.progress_ctx = nullptr;
    }
    try {
      fn(t, o);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

void decode(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
            const TensorView& lse, const ops::AttentionOptions& opts,
            const ops::DecodeOptions& dopts) {
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), Sk = k.size(1), Dv = v.size(3);
  const int64_t splits =
      dopts.num_splits > 0 ? std::min<int64_t>(dopts.num_splits, Sk) : auto_splits(B, Sk);
  // Even chunks, each further cut where the mask changes (same for every sequence).
  const std::vector<int64_t> cuts = mask_cuts(opts, opts.q_offset, opts.q_offset + Sq);
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t s = 0; s < splits; ++s)
    for (const auto& piece : split_at(s * Sk / splits, (s + 1) * Sk / splits, opts.k_offset, cuts))
      chunks.push_back(piece);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  Partials p(B, nc, Sq, Hq, Dv);
  run_tasks(B * nc, opts, [&](int64_t t, const ops::AttentionOptions& o_in) {
    const int64_t b = t / nc, c = t % nc;
    const auto [start, end] = chunks[static_cast<size_t>(c)];
    ops::AttentionOptions o = o_in;
    o.k_offset += start;  // global key positions keep causal/window masks exact
    run_chunk(q.slice(0, b, 1), k.slice(0, b, 1).slice(1, start, end - start),
              v.slice(0, b, 1).slice(1, start, end - start), p.out_view(b, c), p.lse_view(b, c), o);
  });
  combine(p, std::vector<int64_t>(static_cast<size_t>(B), nc), out, lse);
}

void decode_paged(const TensorView& q, const ops::PagedKV& cache, const TensorView& out,
                  const TensorView& lse, const ops::AttentionOptions& opts,
                  const ops::DecodeOptions& dopts) {
  const TensorView& kp = cache.k_pages;
  const TensorView& vp = cache.v_pages;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), Dv = vp.size(3);
  const int64_t ps = kp.size(1);
  auto seq_len = [&](int64_t b) -> int64_t {
    return cache.seq_lens.data_as<const int32_t>()[b * cache.seq_lens.stride(0)];
  };
  auto page_id = [&](int64_t b, int64_t j) -> int64_t {
    const TensorView& pt = cache.page_table;
    return pt.data_as<const int32_t>()[b * pt.stride(0) + j * pt.stride(1)];
  };
  // Consecutive page ids are one contiguous key range when pages are packed back to back.
  const bool can_fuse_pages =
      kp.stride(0) == ps * kp.stride(1) && vp.stride(0) == ps * vp.stride(1);

  // Tasks: sequence b is cut into groups[b] ranges of whole pages.
  std::vector<int64_t> groups(static_cast<size_t>(B), 0);
  int64_t gmax = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = seq_len(b);
    const int64_t pages = (len + ps - 1) / ps;
    const int64_t g = pages == 0             ? 0
                      : dopts.num_splits > 0 ? std::min<int64_t>(dopts.num_splits, pages)
                                             : std::min(pages, auto_splits(B, len));
    groups[static_cast<size_t>(b)] = g;
    gmax = std::max(gmax, g);
  }
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (b, group)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < groups[static_cast<size_t>(b)]; ++g) tasks.emplace_back(b, g);
  Partials p(B, std::max<int64_t>(gmax, 1), Sq, Hq, Dv);

  run_tasks(
      static_cast<int64_t>(tasks.size()), opts, [&](int64_t t, const ops::AttentionOptions& o_in) {
        const auto [b, g] = tasks[static_cast<size_t>(t)];
        const int64_t len = seq_len(b);
        const int64_t pages = (len + ps - 1) / ps;
        const int64_t ng = groups[static_cast<size_t>(b)];
        const int64_t first = g * pages / ng, last = (g + 1) * pages / ng;  // [first, last)
        const TensorView qb = q.slice(0, b, 1);
        const TensorView acc_out = p.out_view(b, g), acc_lse = p.lse_view(b, g);
        Tensor tmp_out, tmp_lse;
        bool have_acc = false;
        for (int64_t j = first; j < last;) {
          // A run of pages j..j+run-1 with consecutive ids is one strided view.
          int64_t run = 1;
          if (can_fuse_pages)
            while (j + run < last && page_id(b, j + run) == page_id(b, j) + run) ++run;
          const int64_t tok0 = j * ps;
          const int64_t ntok = std::min((j + run) * ps, len) - tok0;
          // The run, cut where the mask changes, one piece at a time.
          ops::AttentionOptions o = o_in;
          o.q_offset = len - Sq;  // the queries are the sequence's last Sq positions
          const std::vector<int64_t> cuts = mask_cuts(o, len - Sq, len);
          for (const auto& cut : split_at(0, ntok, tok0, cuts)) {
            // Plain locals, not a structured binding: lambdas capture those only from C++20
            // compilers newer than clang 14 (the sanitizer and fuzz builds use it).
            const int64_t a = cut.first, e = cut.second;
            auto piece = [&, b = b](const TensorView& pool) {
              const int64_t shape[4] = {1, e - a, pool.size(2), pool.size(3)};
              const int64_t strides[4] = {pool.stride(0), pool.stride(1), pool.stride(2), 1};
              const int64_t idx[4] = {page_id(b, j), a, 0, 0};  // a may run past page j
              return TensorView(pool.element_ptr(idx), pool.dtype, pool.device, shape, strides);
            };
            o.k_offset = tok0 + a;
            if (!have_acc) {
              run_chunk(qb, piece(kp), piece(vp), acc_out, acc_lse, o);
              have_acc = true;
            } else {
              if (!tmp_out.defined()) {
                tmp_out = Tensor::empty({1, Sq, Hq, Dv}, DType::kFloat32);
                tmp_lse = Tensor::empty({1, Hq, Sq}, DType::kFloat32);
              }
              run_chunk(qb, piece(kp), piece(vp), tmp_out, tmp_lse, o);
              merge(acc_out, acc_lse, tmp_out, tmp_lse, acc_out, acc_lse);
            }
          }
          j += run;
        }
      });
  combine(p, groups, out, lse);
}

}  // namespace distattn::kernels::cpu
