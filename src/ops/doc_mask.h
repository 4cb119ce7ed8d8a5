#pragma once
// Internal to src/ops and src/parallel: attention over packed documents, sliding windows and
// sink tokens, decomposed into kernel calls that each see ONE document and ONE contiguous
// range of positions on both sides, so every kernel (CPU ISA paths and CUDA) only needs the
// causal/window mask with offsets that it already has.
//
// Rows of a local tensor are described by runs: rows [row, row + len) are tokens of document
// `doc` at document-relative positions [pos, pos + len). doc < 0 marks padding rows (never
// visible, never visible to). A query run and a key run of the same document give at most two
// pieces: the key positions below `sink` (sink tokens: visible under causality alone, the
// window does not apply) and the rest (causal and window). Each piece is trimmed to the query
// rows that see at least one of its keys and to the keys some of those queries see; pieces
// with no visible pair are dropped. The visible pairs of a piece are counted exactly.
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

namespace distattn::ops::docmask {

struct Run {
  int64_t row = 0, len = 0, doc = 0, pos = 0;
};

struct Mask {
  bool causal = false;
  int64_t window_left = -1;   // < 0: unlimited
  int64_t window_right = -1;  // < 0: unlimited
  int64_t sink = 0;           // key positions < sink ignore the window
};

struct Piece {
  int64_t q_row = 0, q_len = 0, k_row = 0, k_len = 0;
  int64_t q_pos = 0, k_pos = 0;  // document positions of the first rows (kernel offsets)
  bool window = true;            // false: sink keys (no window)
  double pairs = 0;              // visible (query, key) pairs
};

inline constexpr int64_t kFar = int64_t{1} << 62;

// Visible key positions of query position i under causal/window (window on or off):
// [lo(i), hi(i)].
inline int64_t key_lo(const Mask& m, bool window, int64_t i) {
  return window && m.window_left >= 0 ? i - m.window_left : -kFar;
}
inline int64_t key_hi(const Mask& m, bool window, int64_t i) {
  int64_t h = kFar;
  if (m.causal) h = i;
  if (window && m.window_right >= 0) h = std::min(h, i + m.window_right);
  return h;
}

// Trims the piece of query positions [qa, qb] x key positions [ka, kb] (inclusive, non-empty).
// Returns false when no pair is visible; otherwise the visible query and key hulls.
inline bool trim(const Mask& m, bool window, int64_t qa, int64_t qb, int64_t ka, int64_t kb,
                 int64_t& qa2, int64_t& qb2, int64_t& ka2, int64_t& kb2, double& pairs) {
  // Query i can see a key of [ka, kb] only if hi(i) >= ka and lo(i) <= kb: a first bound on
  // the query range; each row is then checked exactly while counting its pairs.
  int64_t ia = qa, ib = qb;
  if (m.causal) ia = std::max(ia, ka);
  if (window && m.window_right >= 0) ia = std::max(ia, ka - m.window_right);
  if (window && m.window_left >= 0) ib = std::min(ib, kb + m.window_left);
  if (ia > ib) return false;
  // lo/hi are non-decreasing in i, so the visible keys of [ia, ib] form [lo(ia), hi(ib)].
  pairs = 0;
  bool any = false;
  int64_t first = 0, last = 0;  // positions may be negative (cross shapes)
  for (int64_t i = ia; i <= ib; ++i) {
    const int64_t lo = std::max(ka, key_lo(m, window, i));
    const int64_t hi = std::min(kb, key_hi(m, window, i));
    if (hi < lo) continue;
    if (!any) first = i;
    any = true;
    last = i;
    pairs += static_cast<double>(hi - lo + 1);
  }
  if (!any) return false;
  qa2 = first;
  qb2 = last;
  ka2 = std::max(ka, key_lo(m, window, first));
  kb2 = std::min(kb, key_hi(m, window, last));
  return true;
}

// Appends the pieces of query runs x key runs to `out` (grouped by query run, in order).
inline void pieces(std::span<const Run> qruns, std::span<const Run> kruns, const Mask& m,
                   std::vector<Piece>& out) {
  for (const Run& qr : qruns) {
    if (qr.doc < 0 || qr.len <= 0) continue;
    const size_t first_of_run = out.size();  // pieces join only within one query run
    for (const Run& kr : kruns) {
      if (kr.doc != qr.doc || kr.len <= 0) continue;
      // Split the key run at the sink boundary: [pos, sink) without window, the rest with.
      const int64_t split = std::clamp(m.sink - kr.pos, int64_t{0}, kr.len);
      const struct {
        int64_t off, len;
        bool window;
      } parts[2] = {{0, split, false}, {split, kr.len - split, true}};
      for (const auto& part : parts) {
        if (part.len <= 0) continue;
        const int64_t ka = kr.pos + part.off, kb = ka + part.len - 1;
        int64_t qa2, qb2, ka2, kb2;
        double pairs;
        if (!trim(m, part.window, qr.pos, qr.pos + qr.len - 1, ka, kb, qa2, qb2, ka2, kb2, pairs))
          continue;
        Piece p;
        p.q_row = qr.row + (qa2 - qr.pos);
        p.q_len = qb2 - qa2 + 1;
        p.k_row = kr.row + (ka2 - kr.pos);
        p.k_len = kb2 - ka2 + 1;
        p.q_pos = qa2;
        p.k_pos = ka2;
        p.window = part.window;
        p.pairs = pairs;
        // Without a window in effect, a piece whose keys directly follow the previous
        // piece's keys in memory (same query rows) joins it when the previous one is fully
        // visible and lies wholly at or before this piece's first query: one kernel call with
        // the previous keys placed at virtual positions just below this piece's (causal stays
        // exact: every query sees them all, as it does in fact). Zigzag's two own chunks of a
        // document become one call, as in the plain zigzag ring.
        const bool unwindowed = !p.window || (m.window_left < 0 && m.window_right < 0);
        if (unwindowed && !out.empty() && first_of_run < out.size()) {
          Piece& b = out.back();
          const bool b_unwindowed = !b.window || (m.window_left < 0 && m.window_right < 0);
          const bool b_full =
              b.pairs == static_cast<double>(b.q_len) * static_cast<double>(b.k_len);
          if (b_unwindowed && b_full && b.q_row == p.q_row && b.q_len == p.q_len &&
              b.k_row + b.k_len == p.k_row && (!m.causal || p.k_pos - 1 <= p.q_pos)) {
            b.k_len += p.k_len;
            b.k_pos = p.k_pos - b.k_len + p.k_len;
            b.q_pos = p.q_pos;
            b.window = p.window;
            b.pairs += p.pairs;
            continue;
          }
        }
        out.push_back(p);
      }
    }
  }
}

// Runs of `rows` rows from cu_seqlens (validated): one run per document, positions from 0.
inline std::vector<Run> runs_from_cu(std::span<const int32_t> cu) {
  std::vector<Run> r;
  for (size_t d = 0; d + 1 < cu.size(); ++d)
    r.push_back({cu[d], cu[d + 1] - cu[d], static_cast<int64_t>(d), 0});
  return r;
}

}  // namespace distattn::ops::docmask
