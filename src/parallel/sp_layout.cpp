// Strategy names, layouts (which global tokens and heads a rank holds), shard/unshard.
#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <string>

#include "distattn/parallel/sequence_parallel.h"
#include "src/parallel/sp_detail.h"

namespace distattn::parallel {

namespace {
constexpr std::array<Strategy, 6> kAll = {Strategy::kHeads,     Strategy::kRing,
                                          Strategy::kZigzag,    Strategy::kUlysses,
                                          Strategy::kAllGather, Strategy::kHybrid};

struct Range {
  int64_t begin;
  int64_t len;
};

// Global token ranges of a rank's local rows, in local order.
std::vector<Range> seq_ranges(const SpLayout& l, int64_t s, int rank) {
  const int p = l.ranks;
  switch (l.strategy) {
    case Strategy::kHeads:
      return {{0, s}};
    case Strategy::kRing:
    case Strategy::kUlysses: {
      const int64_t sl = s / p;
      return {{rank * sl, sl}};
    }
    case Strategy::kZigzag:
    case Strategy::kAllGather: {
      const int64_t c = s / (2 * p);
      return {{rank * c, c}, {(2 * p - 1 - rank) * c, c}};
    }
    case Strategy::kHybrid: {
      const int u_deg = l.ulysses;
      const int r_deg = p / u_deg;
      const int rr = rank / u_deg;
      const int u = rank % u_deg;
      const int64_t c = s / (2 * r_deg);
      const int64_t sub = c / u_deg;
      return {{rr * c + u * sub, sub}, {(2 * r_deg - 1 - rr) * c + u * sub, sub}};
    }
  }
  return {};
}

// Bounds of part `i` of `n` of [a, b): as even as possible (sizes differ by at most one).
int64_t split_at(int64_t a, int64_t b, int64_t i, int64_t n) {
  return a + (b - a) * i / n;
}

// Packed zigzag-family layouts: which documents are split and, for whole ones, which of the
// `parts` ranks (ring ranks for hybrid) holds each. A document of length L >= 2*parts*
// min_split_chunk (default 128), or whose work L^2 exceeds 2% of a rank's share, is split into
// 2*parts chunks as zigzag does for one sequence (balanced causal work by itself); shorter
// documents are not split (pieces of a few tokens cost more in kernel calls than they
// balance): they are assigned whole, longest first, each to the rank with the least work so
// far (work ~ L^2, starting from the split documents' equal shares). Deterministic: every
// rank computes the same owners. owner[d] = -1: split.
std::vector<int> packed_owners(std::span<const int32_t> cu, int parts, int64_t min_chunk) {
  const size_t docs = cu.size() - 1;
  std::vector<int> owner(docs, -1);
  std::vector<double> load(static_cast<size_t>(parts), 0.0);
  std::vector<size_t> whole;
  double total = 0;
  for (size_t d = 0; d < docs; ++d) {
    const double len = static_cast<double>(cu[d + 1] - cu[d]);
    total += len * len;
  }
  // A whole document may carry at most 2% of one rank's share: then the greedy assignment
  // ends within ~2% of the mean whatever the lengths.
  const double cap = 0.02 * total / parts;
  for (size_t d = 0; d < docs; ++d) {
    const int64_t len = cu[d + 1] - cu[d];
    const double cost = static_cast<double>(len) * static_cast<double>(len);
    if (parts == 1 || len >= 2 * parts * min_chunk || cost > cap) {
      for (double& x : load) x += cost / parts;
    } else if (len > 0) {
      whole.push_back(d);
    }
  }
  std::stable_sort(whole.begin(), whole.end(),
                   [&](size_t a, size_t b) { return cu[a + 1] - cu[a] > cu[b + 1] - cu[b]; });
  for (size_t d : whole) {
    const int j = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[d] = j;
    const double len = static_cast<double>(cu[d + 1] - cu[d]);
    load[static_cast<size_t>(j)] += len * len;
  }
  return owner;
}

// Packed documents: the token ranges (global rows, with document and document position) of a
// rank's local rows, in local order. Contiguous strategies split the
// packed sequence evenly; zigzag, all-gather and hybrid split each long document into 2P (2R,
// then U pieces) chunks as evenly as possible and keep short ones whole (packed_owners), so
// lengths need no padding and per-rank work stays balanced.
std::vector<detail::TokenRange> packed_ranges(const SpLayout& l, std::span<const int32_t> cu,
                                              int64_t min_chunk, int rank) {
  std::vector<detail::TokenRange> out;
  const int p = l.ranks;
  const int64_t total = cu.back();
  const size_t docs = cu.size() - 1;
  auto push = [&](int64_t a, int64_t b, size_t d) {
    if (b > a) out.push_back({a, b - a, static_cast<int64_t>(d), a - cu[d]});
  };
  switch (l.strategy) {
    case Strategy::kHeads:
      for (size_t d = 0; d < docs; ++d) push(cu[d], cu[d + 1], d);
      break;
    case Strategy::kRing:
    case Strategy::kUlysses: {
      const int64_t lo = split_at(0, total, rank, p), hi = split_at(0, total, rank + 1, p);
      for (size_t d = 0; d < docs; ++d)
        push(std::max<int64_t>(lo, cu[d]), std::min<int64_t>(hi, cu[d + 1]), d);
      break;
    }
    case Strategy::kZigzag:
    case Strategy::kAllGather: {
      const int64_t n = 2 * static_cast<int64_t>(p);
      const std::vector<int> owner = packed_owners(cu, p, min_chunk);
      // Split documents' chunks first, then the whole documents: the rows other ranks attend
      // are one contiguous range, so transfers carry only those (see sp_pieces.cpp).
      for (size_t d = 0; d < docs; ++d) {
        if (owner[d] >= 0) continue;
        for (int64_t c : {static_cast<int64_t>(rank), n - 1 - rank})
          push(split_at(cu[d], cu[d + 1], c, n), split_at(cu[d], cu[d + 1], c + 1, n), d);
      }
      for (size_t d = 0; d < docs; ++d)
        if (owner[d] == rank) push(cu[d], cu[d + 1], d);
      break;
    }
    case Strategy::kHybrid: {
      const int u_deg = l.ulysses, r_deg = p / u_deg, rr = rank / u_deg, u = rank % u_deg;
      const int64_t n = 2 * static_cast<int64_t>(r_deg);
      const std::vector<int> owner = packed_owners(cu, r_deg, min_chunk);
      for (size_t d = 0; d < docs; ++d) {
        if (owner[d] >= 0) continue;
        for (int64_t c : {static_cast<int64_t>(rr), n - 1 - rr}) {
          const int64_t a = split_at(cu[d], cu[d + 1], c, n);
          const int64_t b = split_at(cu[d], cu[d + 1], c + 1, n);
          push(split_at(a, b, u, u_deg), split_at(a, b, u + 1, u_deg), d);
        }
      }
      for (size_t d = 0; d < docs; ++d)  // whole on ring rank owner[d], in U pieces
        if (owner[d] == rr)
          push(split_at(cu[d], cu[d + 1], u, u_deg), split_at(cu[d], cu[d + 1], u + 1, u_deg), d);
      break;
    }
  }
  return out;
}

void check_rank(const SpLayout& l, int rank) {
  DISTATTN_CHECK(rank >= 0 && rank < l.ranks, "rank ", rank, " is outside [0, ", l.ranks,
                 ") for a ", strategy_name(l.strategy), " layout over ", l.ranks, " ranks");
}
}  // namespace

namespace detail {

std::vector<TokenRange> token_ranges(const SpLayout& l, const SpShape& sh, int rank) {
  if (!sh.cu_seqlens.empty()) return packed_ranges(l, sh.cu_seqlens, sh.min_split_chunk, rank);
  std::vector<TokenRange> out;
  for (const Range& r : seq_ranges(l, sh.seq, rank)) out.push_back({r.begin, r.len, 0, r.begin});
  return out;
}

std::vector<ops::docmask::Run> local_runs(const SpLayout& l, const SpShape& sh, int rank) {
  std::vector<ops::docmask::Run> runs;
  int64_t row = 0;
  for (const TokenRange& t : token_ranges(l, sh, rank)) {
    // Adjacent ranges of one document with consecutive positions (zigzag chunks P-1 and P
    // on rank P-1) are one run: one kernel call instead of two and a merge.
    if (!runs.empty() && runs.back().doc == t.doc && runs.back().pos + runs.back().len == t.pos) {
      runs.back().len += t.len;
    } else {
      runs.push_back({row, t.len, t.doc, t.pos});
    }
    row += t.len;
  }
  return runs;
}

int64_t runs_rows(const std::vector<ops::docmask::Run>& runs) {
  int64_t n = 0;
  for (const auto& r : runs) n = std::max(n, r.row + r.len);
  return n;
}

}  // namespace detail

const char* strategy_name(Strategy s) {
  switch (s) {
    case Strategy::kHeads:
      return "heads";
    case Strategy::kRing:
      return "ring";
    case Strategy::kZigzag:
      return "zigzag";
    case Strategy::kUlysses:
      return "ulysses";
    case Strategy::kAllGather:
      return "allgather";
    case Strategy::kHybrid:
      return "hybrid";
  }
  return "?";
}

Strategy parse_strategy(std::string_view name) {
  for (Strategy s : kAll)
    if (name == strategy_name(s)) return s;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown sequence-parallel strategy '", name,
                 "' (use heads, ring, zigzag, ulysses, allgather or hybrid)");
}

std::span<const Strategy> all_strategies() {
  return kAll;
}

void check_layout(const SpLayout& l, const SpShape& sh) {
  const char* name = strategy_name(l.strategy);
  const int p = l.ranks;
  DISTATTN_CHECK(p >= 1, name, ": the rank count must be at least 1, got ", p);
  DISTATTN_CHECK(sh.batch >= 1 && sh.seq >= 1 && sh.head_dim >= 1 && sh.dim_v() >= 1, name,
                 ": batch, seq and head dims must be positive (batch ", sh.batch, ", seq ", sh.seq,
                 ", head_dim ", sh.head_dim, ", head_dim_v ", sh.dim_v(), ")");
  DISTATTN_CHECK(sh.heads_kv >= 1 && sh.heads_q >= 1 && sh.heads_q % sh.heads_kv == 0, name,
                 ": query heads (", sh.heads_q, ") must be a positive multiple of KV heads (",
                 sh.heads_kv, ")");
  if (!sh.cu_seqlens.empty()) {
    const auto& cu = sh.cu_seqlens;
    DISTATTN_CHECK(cu.size() >= 2 && cu[0] == 0, name,
                   ": cu_seqlens must hold n_docs + 1 >= 2 offsets starting at 0 (got ", cu.size(),
                   " offsets", cu.empty() ? "" : ", first " + std::to_string(cu[0]), ")");
    for (size_t i = 1; i < cu.size(); ++i)
      DISTATTN_CHECK(cu[i] >= cu[i - 1], name,
                     ": cu_seqlens must be non-decreasing, but cu_seqlens[", i, "] = ", cu[i],
                     " < cu_seqlens[", i - 1, "] = ", cu[i - 1]);
    DISTATTN_CHECK(cu.back() == sh.seq, name, ": cu_seqlens ends at ", cu.back(),
                   " but the packed sequence has ", sh.seq, " tokens (SpShape::seq)");
    DISTATTN_CHECK(sh.batch == 1, name, ": packed documents (cu_seqlens) need batch 1, got ",
                   sh.batch);
    DISTATTN_CHECK(sh.min_split_chunk >= 1, name, ": min_split_chunk must be >= 1, got ",
                   sh.min_split_chunk);
  }
  const bool packed = !sh.cu_seqlens.empty();
  auto need_multiple = [&](int64_t m, const char* what) {
    if (packed) return;  // documents are split evenly per rank: no multiple needed
    // Only end padding is offered: under the causal mask keys after every real query never
    // reach a real row, so the result is exact. There is no key-length/key-mask option, so
    // padded keys WOULD leak into non-causal rows; say so instead of hinting at a mask.
    const int64_t padded = (sh.seq + m - 1) / m * m;
    DISTATTN_CHECK(sh.seq % m == 0, name, " over ", p,
                   " ranks needs the sequence length to be a multiple of ", m, " (", what,
                   "); got ", sh.seq, ". Causal attention: pad it at the END to ", padded,
                   " and discard the padded query rows (padded keys come after every real "
                   "query, so the causal mask hides them). Non-causal attention has no "
                   "key-length option: choose a sequence length that is a multiple of ",
                   m, " (e.g. ", padded, ")");
  };
  switch (l.strategy) {
    case Strategy::kHeads:
      DISTATTN_CHECK(sh.heads_q >= p, "heads: head parallel over ", p,
                     " ranks needs at least one query head per rank; got ", sh.heads_q,
                     " query heads (use at most ", sh.heads_q, " ranks, or a sequence strategy)");
      break;
    case Strategy::kRing:
      need_multiple(p, "ranks");
      break;
    case Strategy::kUlysses:
      need_multiple(p, "ranks");
      DISTATTN_CHECK(sh.heads_q >= p, "ulysses over ", p,
                     " ranks needs at least one query head per rank; got ", sh.heads_q,
                     " query heads (use the hybrid strategy with --ulysses <= ", sh.heads_q, ")");
      break;
    case Strategy::kZigzag:
    case Strategy::kAllGather:
      need_multiple(2 * static_cast<int64_t>(p), "2*ranks");
      break;
    case Strategy::kHybrid:
      DISTATTN_CHECK(l.ulysses >= 1 && p % l.ulysses == 0, "hybrid: the Ulysses degree ", l.ulysses,
                     " must divide the rank count ", p, " (ring degree = ranks / ulysses)");
      DISTATTN_CHECK(sh.heads_q >= l.ulysses, "hybrid: Ulysses degree ", l.ulysses,
                     " needs at least that many query heads; got ", sh.heads_q);
      need_multiple(2 * static_cast<int64_t>(p), "2*ring*ulysses");
      break;
  }
}

int64_t local_seq_len(const SpLayout& l, int64_t s) {
  return l.strategy == Strategy::kHeads ? s : s / l.ranks;
}

int64_t local_seq_len(const SpLayout& l, const SpShape& sh, int rank) {
  check_rank(l, rank);
  if (sh.cu_seqlens.empty()) return local_seq_len(l, sh.seq);
  int64_t n = 0;
  for (const auto& t : detail::token_ranges(l, sh, rank)) n += t.len;
  return n;
}

namespace {
// The token ranges of `rank` for packed documents alone (heads do not matter), validated.
std::vector<detail::TokenRange> packed_token_ranges(const char* op, const SpLayout& l,
                                                    std::span<const int32_t> cu, int rank,
                                                    int64_t min_chunk) {
  check_rank(l, rank);
  DISTATTN_CHECK(!cu.empty(), op,
                 ": cu_seqlens is empty (for one document use the overload that takes the "
                 "sequence length)");
  SpShape sh;
  sh.seq = cu.back();
  sh.cu_seqlens.assign(cu.begin(), cu.end());
  sh.min_split_chunk = min_chunk;
  sh.heads_q = sh.heads_kv = l.strategy == Strategy::kHybrid ? l.ulysses : l.ranks;
  check_layout(l, sh);
  return detail::token_ranges(l, sh, rank);
}
}  // namespace

std::vector<int64_t> token_positions(const SpLayout& l, std::span<const int32_t> cu_seqlens,
                                     int rank, int64_t min_split_chunk) {
  std::vector<int64_t> pos;
  for (const auto& t : packed_token_ranges("token_positions", l, cu_seqlens, rank, min_split_chunk))
    for (int64_t i = 0; i < t.len; ++i) pos.push_back(t.pos + i);
  return pos;
}

std::vector<int32_t> token_documents(const SpLayout& l, std::span<const int32_t> cu_seqlens,
                                     int rank, int64_t min_split_chunk) {
  std::vector<int32_t> docs;
  for (const auto& t : packed_token_ranges("token_documents", l, cu_seqlens, rank, min_split_chunk))
    for (int64_t i = 0; i < t.len; ++i) docs.push_back(static_cast<int32_t>(t.doc));
  return docs;
}

std::vector<int64_t> token_positions(const SpLayout& l, int64_t s, int rank) {
  check_rank(l, rank);
  SpShape sh;
  sh.seq = s;
  sh.heads_q = sh.heads_kv = l.ranks;  // heads do not matter for positions
  if (l.strategy == Strategy::kHybrid) sh.heads_q = sh.heads_kv = l.ulysses;
  check_layout(l, sh);
  std::vector<int64_t> pos;
  pos.reserve(static_cast<size_t>(local_seq_len(l, s)));
  for (const Range& r : seq_ranges(l, s, rank))
    for (int64_t i = 0; i < r.len; ++i) pos.push_back(r.begin + i);
  return pos;
}

std::vector<int64_t> token_positions(Strategy strategy, int64_t s, int ranks, int rank) {
  DISTATTN_CHECK(strategy != Strategy::kHybrid,
                 "token_positions: hybrid needs the Ulysses degree; call the SpLayout overload");
  return token_positions(SpLayout{strategy, ranks, 1}, s, rank);
}

HeadRange split_heads(int64_t heads, int parts, int rank) {
  DISTATTN_CHECK(parts >= 1 && rank >= 0 && rank < parts, "split_heads: rank ", rank,
                 " outside [0, ", parts, ")");
  const int64_t base = heads / parts, extra = heads % parts;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

HeadRange local_query_heads(const SpLayout& l, const SpShape& sh, int rank) {
  check_rank(l, rank);
  if (l.strategy == Strategy::kHeads) return split_heads(sh.heads_q, l.ranks, rank);
  return {0, sh.heads_q};
}

HeadRange local_kv_heads(const SpLayout& l, const SpShape& sh, int rank) {
  check_rank(l, rank);
  if (l.strategy != Strategy::kHeads) return {0, sh.heads_kv};
  DISTATTN_CHECK(sh.heads_kv >= 1 && sh.heads_q % sh.heads_kv == 0, "query heads (", sh.heads_q,
                 ") must be a multiple of KV heads (", sh.heads_kv, ")");
  const HeadRange q = split_heads(sh.heads_q, l.ranks, rank);
  const int64_t g = sh.heads_q / sh.heads_kv;
  if (q.size() == 0) return {0, 0};
  return detail::kv_heads_of(q, g);
}

namespace {
void check_full(const char* op, const SpShape& sh, ShardRole role, const TensorView& full) {
  const int64_t heads = role == ShardRole::kKeyValue ? sh.heads_kv : sh.heads_q;
  if (role == ShardRole::kLse) {
    DISTATTN_CHECK(full.ndim == 3 && full.size(0) == sh.batch && full.size(1) == heads &&
                       full.size(2) == sh.seq,
                   op, ": full lse ", full.str(), " must be [", sh.batch, ", ", heads, ", ", sh.seq,
                   "]");
  } else {
    DISTATTN_CHECK(full.ndim == 4 && full.size(0) == sh.batch && full.size(1) == sh.seq &&
                       full.size(2) == heads,
                   op, ": full ", role == ShardRole::kQuery ? "query-like" : "key/value-like",
                   " tensor ", full.str(), " must be [", sh.batch, ", ", sh.seq, ", ", heads,
                   ", head_dim]");
  }
}

HeadRange role_heads(const SpLayout& l, const SpShape& sh, int rank, ShardRole role) {
  return role == ShardRole::kKeyValue ? local_kv_heads(l, sh, rank)
                                      : local_query_heads(l, sh, rank);
}

TensorView seq_slice(const TensorView& t, ShardRole role, int64_t begin, int64_t len) {
  return t.slice(role == ShardRole::kLse ? 2 : 1, begin, len);
}
TensorView head_slice(const TensorView& t, ShardRole role, HeadRange h) {
  return t.slice(role == ShardRole::kLse ? 1 : 2, h.begin, h.size());
}
}  // namespace

Tensor shard(const SpLayout& l, const SpShape& sh, int rank, ShardRole role,
             const TensorView& full) {
  check_layout(l, sh);
  check_rank(l, rank);
  check_full("shard", sh, role, full);
  const HeadRange h = role_heads(l, sh, rank, role);
  const int64_t sl = local_seq_len(l, sh, rank);
  std::vector<int64_t> shape(full.shape.begin(), full.shape.begin() + full.ndim);
  if (role == ShardRole::kLse) {
    shape[1] = h.size();
    shape[2] = sl;
  } else {
    shape[1] = sl;
    shape[2] = h.size();
  }
  Tensor out = Tensor::empty(shape, full.dtype, full.device);
  const TensorView src = head_slice(full, role, h);
  int64_t at = 0;
  for (const auto& r : detail::token_ranges(l, sh, rank)) {
    detail::copy_view(seq_slice(out.view(), role, at, r.len), seq_slice(src, role, r.begin, r.len),
                      nullptr);
    at += r.len;
  }
  // No stream argument: the shard is ready when this returns, as on the CPU.
  stream_synchronize(full.device, nullptr);
  return out;
}

void unshard_into(const SpLayout& l, const SpShape& sh, int rank, ShardRole role,
                  const TensorView& local, const TensorView& full, bool accumulate) {
  check_layout(l, sh);
  check_rank(l, rank);
  check_full("unshard_into", sh, role, full);
  const HeadRange h = role_heads(l, sh, rank, role);
  const int64_t sl = local_seq_len(l, sh, rank);
  const int sd = role == ShardRole::kLse ? 2 : 1, hd = role == ShardRole::kLse ? 1 : 2;
  DISTATTN_CHECK(local.ndim == full.ndim && local.size(0) == sh.batch && local.size(sd) == sl &&
                     local.size(hd) == h.size() &&
                     (role == ShardRole::kLse || local.size(3) == full.size(3)),
                 "unshard_into: local shard ", local.str(), " does not match rank ", rank,
                 "'s shard of ", full.str(), " (", sl, " rows, ", h.size(), " heads)");
  const TensorView dst = head_slice(full, role, h);
  // A shard on another device (e.g. a GPU result into a host tensor) is first copied to
  // full's device; then copies and adds run there.
  Tensor staged;
  TensorView src = local;
  if (local.device != full.device) {
    staged = Tensor::empty(std::span<const int64_t>(local.shape.data(), local.ndim), local.dtype,
                           full.device);
    detail::copy_view(staged.view(), local, nullptr);
    src = staged.view();
  }
  int64_t at = 0;
  for (const auto& r : detail::token_ranges(l, sh, rank)) {
    const TensorView d = seq_slice(dst, role, r.begin, r.len);
    const TensorView s = seq_slice(src, role, at, r.len);
    if (accumulate) {
      detail::add_view(d, s, nullptr);
    } else {
      detail::copy_view(d, s, nullptr);
    }
    at += r.len;
  }
  // No stream argument: `full` is updated when this returns, as on the CPU.
  stream_synchronize(full.device, nullptr);
}

double rank_forward_flops(const SpLayout& l, const SpShape& sh, int rank, bool causal) {
  check_layout(l, sh);
  check_rank(l, rank);
  // Which (heads, query positions) this rank attends over the full key set.
  int64_t heads = sh.heads_q;
  std::vector<Range> q;
  switch (l.strategy) {
    case Strategy::kHeads:
      heads = split_heads(sh.heads_q, l.ranks, rank).size();
      q = {{0, sh.seq}};
      break;
    case Strategy::kRing:
    case Strategy::kZigzag:
    case Strategy::kAllGather:
      q = seq_ranges(l, sh.seq, rank);
      break;
    case Strategy::kUlysses:
      heads = split_heads(sh.heads_q, l.ranks, rank).size();
      q = {{0, sh.seq}};
      break;
    case Strategy::kHybrid: {
      const int u_deg = l.ulysses;
      heads = split_heads(sh.heads_q, u_deg, rank % u_deg).size();
      q = seq_ranges(SpLayout{Strategy::kZigzag, l.ranks / u_deg, 1}, sh.seq, rank / u_deg);
      break;
    }
  }
  double pairs = 0;
  for (const Range& r : q) pairs += detail::visible_pairs(r.len, sh.seq, r.begin, 0, causal);
  return 4.0 * static_cast<double>(sh.batch * heads * sh.head_dim) * pairs;
}

SpGroup SpGroup::from_mesh(const comm::DeviceMesh& mesh, const std::string& ring_axis,
                           const std::string& ulysses_axis) {
  return {&mesh.comm(ring_axis), &mesh.comm(ulysses_axis)};
}

SpLayout SpGroup::layout(Strategy strategy) const {
  DISTATTN_CHECK(seq != nullptr, "SpGroup has no sequence communicator");
  if (strategy == Strategy::kHybrid) {
    DISTATTN_CHECK(ulysses != nullptr,
                   "the hybrid strategy needs a Ulysses communicator: build the group with "
                   "SpGroup::from_mesh over a mesh with 'ring' and 'ulysses' axes");
    return {strategy, seq->size() * ulysses->size(), ulysses->size()};
  }
  return {strategy, seq->size(), 1};
}

int SpGroup::layout_rank(Strategy strategy) const {
  if (strategy == Strategy::kHybrid) {
    DISTATTN_CHECK(seq != nullptr && ulysses != nullptr,
                   "the hybrid strategy needs ring and Ulysses communicators");
    return seq->rank() * ulysses->size() + ulysses->rank();
  }
  DISTATTN_CHECK(seq != nullptr, "SpGroup has no sequence communicator");
  return seq->rank();
}

}  // namespace distattn::parallel

namespace distattn::parallel {

double rank_visible_pairs(const SpLayout& l, const SpShape& sh, int rank, const SpOptions& o) {
  check_layout(l, sh);
  check_rank(l, rank);
  const ops::docmask::Mask m{o.causal, o.window_left, o.window_right, o.sink_tokens};
  const detail::Runs mine = detail::local_runs(l, sh, rank);
  const detail::Runs all = detail::local_runs(SpLayout{Strategy::kHeads, l.ranks, 1}, sh, 0);
  std::vector<ops::docmask::Piece> ps;
  ops::docmask::pieces(mine, all, m, ps);
  double pairs = 0;
  for (const auto& x : ps) pairs += x.pairs;
  return pairs;
}

}  // namespace distattn::parallel

namespace distattn::parallel {

std::vector<int64_t> longtail_document_lengths(int64_t total, uint64_t seed) {
  DISTATTN_CHECK(total >= 1, "longtail_document_lengths: total must be >= 1, got ", total);
  // splitmix64 stream: the same lengths on every platform for a seed.
  uint64_t state = seed;
  auto next_uniform = [&state]() {
    uint64_t x = (state += 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    return static_cast<double>(x >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  };
  std::vector<int64_t> docs;
  int64_t left = total;
  while (left > 0) {
    const double x = 16.0 / std::pow(1.0 - next_uniform(), 1.0 / 1.1);
    const int64_t l =
        std::min<int64_t>(left, std::max<int64_t>(1, x >= 9e18 ? left : static_cast<int64_t>(x)));
    docs.push_back(l);
    left -= l;
  }
  return docs;
}

std::vector<int32_t> cu_seqlens_of(std::span<const int64_t> lengths) {
  std::vector<int32_t> cu{0};
  int64_t at = 0;
  for (int64_t l : lengths) {
    DISTATTN_CHECK(l >= 0, "cu_seqlens_of: document lengths must be >= 0, got ", l);
    at += l;
    DISTATTN_CHECK(at <= INT32_MAX, "cu_seqlens_of: ", at,
                   " tokens do not fit int32 cu_seqlens (at most 2^31-1)");
    cu.push_back(static_cast<int32_t>(at));
  }
  return cu;
}

}  // namespace distattn::parallel
