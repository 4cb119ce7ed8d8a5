// Strategy names, layouts (which global tokens and heads a rank holds), shard/unshard.
#include <array>
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

void check_rank(const SpLayout& l, int rank) {
  DISTATTN_CHECK(rank >= 0 && rank < l.ranks, "rank ", rank, " is outside [0, ", l.ranks,
                 ") for a ", strategy_name(l.strategy), " layout over ", l.ranks, " ranks");
}
}  // namespace

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
  auto need_multiple = [&](int64_t m, const char* what) {
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
  return {q.begin / g, (q.end - 1) / g + 1};
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
  const int64_t sl = local_seq_len(l, sh.seq);
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
  for (const Range& r : seq_ranges(l, sh.seq, rank)) {
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
  const int64_t sl = local_seq_len(l, sh.seq);
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
  for (const Range& r : seq_ranges(l, sh.seq, rank)) {
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
