// Flash-decoding on the CPU: a decode step has too few queries to keep the cores busy
// through the query dimension, so the key range of every sequence is split into chunks, the
// (sequence, chunk) tasks run in parallel through flash_forward (GQA heads packed as rows,
// see run_chunk) into fp32 partials (out,
// lse), and the partials are combined with the LSE merge. The paged variant makes every run
// of consecutive pages of a sequence a chunk (a strided view into the page pools) and
// folds the runs of one task together with kernels::cpu::merge.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <vector>

#include "distattn/core/half.h"
#include "kernels/cpu/attention_cpu.h"

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

// View with the given shape/strides at element offset `off` of t's data.
TensorView view_at(const TensorView& t, int64_t off, std::initializer_list<int64_t> shape,
                   std::initializer_list<int64_t> strides) {
  return TensorView(static_cast<char*>(t.data) + off * static_cast<int64_t>(t.element_size()),
                    t.dtype, t.device, std::span<const int64_t>(shape.begin(), shape.size()),
                    std::span<const int64_t>(strides.begin(), strides.size()));
}

// One key chunk of one sequence: q [1, Sq, Hq, D], k/v [1, n, Hkv, D/Dv] (keys at global
// positions o.k_offset...), into fp32 out [1, Sq, Hq, Dv] and lse [1, Hq, Sq].
// Decode has a handful of query rows per head, too few for the kernel's query tiles; but the
// g = Hq/Hkv query heads of a KV group read the same keys, so where the mask cannot tell the
// g heads of one query apart (the chunk is wholly visible to it) they go to flash_forward as
// g rows of one head (a strided view), and the keys are read once per group instead of g
// times. Chunks cut by the mask take the plain per-head path.
void run_chunk(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const TensorView& lse, const ops::AttentionOptions& o) {
  const int64_t Sq = q.size(1), Hq = q.size(2), D = q.size(3), n = k.size(1), Hkv = k.size(2);
  const int64_t Dv = v.size(3), g = Hq / Hkv;
  const int64_t k0 = o.k_offset, k1 = o.k_offset + n;
  ops::AttentionOptions packed = o;
  packed.causal = false;
  packed.window_left = packed.window_right = -1;
  packed.softmax_scale = o.scale_for(D);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < Sq; ++i) {
    const int64_t qpos = o.q_offset + i;
    const bool none = none_visible(o, qpos, k0, k1);
    const bool all = !none && all_visible(o, qpos, k0, k1);
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const int64_t h0 = hk * g;
      const TensorView out_rows = view_at(out, i * out.stride(1) + h0 * out.stride(2),
                                          {1, g, 1, Dv}, {0, out.stride(2), 0, 1});
      const TensorView lse_rows =
          view_at(lse, h0 * lse.stride(1) + i * lse.stride(2), {1, 1, g}, {0, 0, lse.stride(1)});
      if (none) {
        for (int64_t r = 0; r < g; ++r) {
          std::fill_n(out_rows.data_as<float>() + r * out.stride(2), Dv, 0.0f);
          lse_rows.data_as<float>()[r * lse.stride(1)] = neg_inf;
        }
        continue;
      }
      const TensorView kh = view_at(k, hk * k.stride(2), {1, n, 1, D}, {0, k.stride(1), 0, 1});
      const TensorView vh = view_at(v, hk * v.stride(2), {1, n, 1, Dv}, {0, v.stride(1), 0, 1});
      if (all) {
        const TensorView q_rows =
            view_at(q, i * q.stride(1) + h0 * q.stride(2), {1, g, 1, D}, {0, q.stride(2), 0, 1});
        flash_forward(q_rows, kh, vh, out_rows, lse_rows, packed);
      } else {
        // Heads as heads, one query: positions (and so the mask) stay exact.
        ops::AttentionOptions oi = o;
        oi.q_offset = qpos;
        const TensorView q_heads =
            view_at(q, i * q.stride(1) + h0 * q.stride(2), {1, 1, g, D}, {0, 0, q.stride(2), 1});
        const TensorView out_heads = view_at(out, i * out.stride(1) + h0 * out.stride(2),
                                             {1, 1, g, Dv}, {0, 0, out.stride(2), 1});
        const TensorView lse_heads =
            view_at(lse, h0 * lse.stride(1) + i * lse.stride(2), {1, g, 1}, {0, lse.stride(1), 0});
        flash_forward(q_heads, kh, vh, out_heads, lse_heads, oi);
      }
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
  Partials p(B, splits, Sq, Hq, Dv);
  run_tasks(B * splits, opts, [&](int64_t t, const ops::AttentionOptions& o_in) {
    const int64_t b = t / splits, s = t % splits;
    const int64_t start = s * Sk / splits, end = (s + 1) * Sk / splits;
    ops::AttentionOptions o = o_in;
    o.k_offset += start;  // global key positions keep causal/window masks exact
    run_chunk(q.slice(0, b, 1), k.slice(0, b, 1).slice(1, start, end - start),
              v.slice(0, b, 1).slice(1, start, end - start), p.out_view(b, s), p.lse_view(b, s), o);
  });
  combine(p, std::vector<int64_t>(static_cast<size_t>(B), splits), out, lse);
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

  run_tasks(static_cast<int64_t>(tasks.size()), opts,
            [&](int64_t t, const ops::AttentionOptions& o_in) {
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
                auto chunk = [&](const TensorView& pool) {
                  const int64_t shape[4] = {1, ntok, pool.size(2), pool.size(3)};
                  const int64_t strides[4] = {pool.stride(0), pool.stride(1), pool.stride(2), 1};
                  const int64_t idx[4] = {page_id(b, j), 0, 0, 0};
                  return TensorView(pool.element_ptr(idx), pool.dtype, pool.device, shape, strides);
                };
                ops::AttentionOptions o = o_in;
                o.q_offset = len - Sq;  // the queries are the sequence's last Sq positions
                o.k_offset = tok0;
                if (!have_acc) {
                  run_chunk(qb, chunk(kp), chunk(vp), acc_out, acc_lse, o);
                  have_acc = true;
                } else {
                  if (!tmp_out.defined()) {
                    tmp_out = Tensor::empty({1, Sq, Hq, Dv}, DType::kFloat32);
                    tmp_lse = Tensor::empty({1, Hq, Sq}, DType::kFloat32);
                  }
                  run_chunk(qb, chunk(kp), chunk(vp), tmp_out, tmp_lse, o);
                  merge(acc_out, acc_lse, tmp_out, tmp_lse, acc_out, acc_lse);
                }
                j += run;
              }
            });
  combine(p, groups, out, lse);
}

}  // namespace distattn::kernels::cpu
