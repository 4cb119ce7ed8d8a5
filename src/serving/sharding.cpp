// Shard maps of both sides and the transfer plan between them (distattn/serving/sharding.h).
#include "distattn/serving/sharding.h"

#include <algorithm>
#include <tuple>

#include "distattn/core/error.h"

namespace distattn::serving {

namespace {

int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

// KV heads [begin, end) a rank of a head-parallel layout over `ranks` ranks stores: those its
// query heads use, for the model's query/KV head counts. The serving model splits query heads
// with parallel::split_heads, so KV head ranges follow parallel::local_kv_heads.
KvBlock head_units(int64_t kv_heads, int64_t q_heads, int ranks, int rank) {
  parallel::SpLayout l{parallel::Strategy::kHeads, ranks, 1};
  parallel::SpShape s;
  s.heads_q = q_heads;
  s.heads_kv = kv_heads;
  const parallel::HeadRange r = parallel::local_kv_heads(l, s, rank);
  KvBlock b;
  b.unit_begin = r.begin;
  b.unit_end = r.end;
  return b;
}

}  // namespace

const char* family_name(ModelFamily f) {
  return f == ModelFamily::kGqa ? "gqa" : "mla";
}

ModelFamily parse_family(std::string_view name) {
  if (name == "gqa") return ModelFamily::kGqa;
  if (name == "mla") return ModelFamily::kMla;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown model '", name, "'; use gqa or mla");
}

const char* prefill_sharding_name(PrefillSharding s) {
  switch (s) {
    case PrefillSharding::kHeads:
      return "heads";
    case PrefillSharding::kZigzag:
      return "zigzag";
    case PrefillSharding::kUlysses:
      return "ulysses";
    case PrefillSharding::kHybrid:
      return "hybrid";
  }
  return "?";
}

const char* decode_sharding_name(DecodeSharding s) {
  switch (s) {
    case DecodeSharding::kHeads:
      return "heads";
    case DecodeSharding::kDecodeCp:
      return "decode-cp";
    case DecodeSharding::kMlaTp:
      return "mla-tp";
    case DecodeSharding::kTpla:
      return "tpla";
  }
  return "?";
}

PrefillSharding parse_prefill_sharding(std::string_view name) {
  for (PrefillSharding s : {PrefillSharding::kHeads, PrefillSharding::kZigzag,
                            PrefillSharding::kUlysses, PrefillSharding::kHybrid})
    if (name == prefill_sharding_name(s)) return s;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown prefill sharding '", name,
                 "'; use heads, zigzag, ulysses or hybrid");
}

DecodeSharding parse_decode_sharding(std::string_view name) {
  for (DecodeSharding s : {DecodeSharding::kHeads, DecodeSharding::kDecodeCp,
                           DecodeSharding::kMlaTp, DecodeSharding::kTpla})
    if (name == decode_sharding_name(s)) return s;
  DISTATTN_THROW(Status::kInvalidArgument, "unknown decode sharding '", name,
                 "'; use heads or decode-cp (GQA), mla-tp, tpla or decode-cp (MLA)");
}

parallel::SpLayout PrefillLayout::sp_layout() const {
  parallel::SpLayout l;
  l.ranks = ranks;
  l.ulysses = sharding == PrefillSharding::kHybrid ? ulysses : 1;
  switch (sharding) {
    case PrefillSharding::kHeads:
      l.strategy = parallel::Strategy::kHeads;
      break;
    case PrefillSharding::kZigzag:
      l.strategy = parallel::Strategy::kZigzag;
      break;
    case PrefillSharding::kUlysses:
      l.strategy = parallel::Strategy::kUlysses;
      break;
    case PrefillSharding::kHybrid:
      l.strategy = parallel::Strategy::kHybrid;
      break;
  }
  return l;
}

int64_t PrefillLayout::padded_length(int64_t tokens) const {
  switch (sharding) {
    case PrefillSharding::kHeads:
      return tokens;
    case PrefillSharding::kZigzag:
      return round_up(tokens, 2 * static_cast<int64_t>(ranks));
    case PrefillSharding::kUlysses:
      return round_up(tokens, ranks);
    case PrefillSharding::kHybrid:
      return round_up(tokens, 2 * static_cast<int64_t>(ranks));
  }
  return tokens;
}

void validate_layouts(const KvGeometry& g, const PrefillLayout& p, const DecodeLayout& d) {
  DISTATTN_CHECK(g.layers >= 1, "serving: layers must be >= 1; got ", g.layers);
  DISTATTN_CHECK(g.page_size >= 1, "serving: --page-size must be >= 1; got ", g.page_size);
  DISTATTN_CHECK(p.ranks >= 1 && d.ranks >= 1, "serving: the prefill and decode groups need at ",
                 "least one rank each; got ", p.ranks, " + ", d.ranks);
  DISTATTN_CHECK(g.dtype == DType::kFloat32 || g.dtype == DType::kBFloat16,
                 "serving: --dtype must be fp32 or bf16; got ", dtype_name(g.dtype));
  if (g.family == ModelFamily::kGqa) {
    DISTATTN_CHECK(d.sharding == DecodeSharding::kHeads || d.sharding == DecodeSharding::kDecodeCp,
                   "serving: --model gqa decodes with --decode-sharding heads or decode-cp; got ",
                   decode_sharding_name(d.sharding));
    DISTATTN_CHECK(g.kv_heads >= 1 && g.heads >= g.kv_heads && g.heads % g.kv_heads == 0,
                   "serving: --heads (", g.heads, ") must be a multiple of --kv-heads (",
                   g.kv_heads, ")");
    DISTATTN_CHECK(g.head_dim >= 2 && g.head_dim % 2 == 0 && g.head_dim_v >= 1,
                   "serving: --head-dim must be even (RoPE rotates pairs); got ", g.head_dim);
  } else {
    DISTATTN_CHECK(d.sharding != DecodeSharding::kHeads,
                   "serving: --model mla decodes with --decode-sharding mla-tp, tpla or "
                   "decode-cp; 'heads' is the GQA name (MLA's head split is mla-tp)");
    DISTATTN_CHECK(p.sharding == PrefillSharding::kHeads,
                   "serving: MLA prefill runs exact MLA with heads split (--prefill-sharding "
                   "heads); got ",
                   prefill_sharding_name(p.sharding));
    if (d.sharding == DecodeSharding::kTpla) {
      const int gr = d.groups();
      DISTATTN_CHECK(gr >= 1 && d.ranks % gr == 0, "serving: TPLA groups (", gr,
                     ") must divide the decode ranks (", d.ranks,
                     "): use --tpla-groups 0 (= ", d.ranks, ") or a divisor");
      DISTATTN_CHECK(g.latent % gr == 0, "serving: TPLA groups (", gr,
                     ") must divide the latent width (", g.latent, ")");
    }
  }
  if (p.sharding == PrefillSharding::kHybrid) {
    DISTATTN_CHECK(p.ulysses >= 1 && p.ranks % p.ulysses == 0, "serving: hybrid prefill needs ",
                   "--prefill-ulysses to divide the prefill ranks (", p.ranks, "); got ",
                   p.ulysses);
  }
}

std::vector<KvBlock> prefill_holdings(const KvGeometry& g, const PrefillLayout& p, int rank,
                                      int64_t tokens) {
  DISTATTN_CHECK(rank >= 0 && rank < p.ranks, "prefill_holdings: rank ", rank, " of ", p.ranks);
  std::vector<KvBlock> out;
  if (tokens <= 0) return out;
  if (g.family == ModelFamily::kMla) {
    out.push_back({0, tokens, 0, g.latent, 0});
    return out;
  }
  if (p.sharding == PrefillSharding::kHeads) {
    // The prefill model splits query heads; its KV heads are those its queries use.
    KvBlock b = head_units(g.kv_heads, g.heads, p.ranks, rank);
    b.token_begin = 0;
    b.token_end = tokens;
    out.push_back(b);
    return out;
  }
  const int64_t padded = p.padded_length(tokens);
  const std::vector<int64_t> pos = parallel::token_positions(p.sp_layout(), padded, rank);
  // Runs of consecutive positions, in local row order; padding (>= tokens) is a suffix of
  // every rank's rows, so clipping it never shifts a later run.
  int64_t row = 0;
  for (size_t i = 0; i < pos.size();) {
    size_t j = i + 1;
    while (j < pos.size() && pos[j] == pos[j - 1] + 1) ++j;
    const int64_t b = pos[i], e = std::min<int64_t>(pos[j - 1] + 1, tokens);
    if (b < e) out.push_back({b, e, 0, g.kv_heads, row});
    row += static_cast<int64_t>(j - i);
    i = j;
  }
  return out;
}

KvBlock decode_units(const KvGeometry& g, const DecodeLayout& d, int rank) {
  DISTATTN_CHECK(rank >= 0 && rank < d.ranks, "decode_units: rank ", rank, " of ", d.ranks);
  KvBlock b;
  switch (d.sharding) {
    case DecodeSharding::kHeads:
      return head_units(g.kv_heads, g.heads, d.ranks, rank);
    case DecodeSharding::kTpla: {
      const int groups = d.groups();
      const int group = rank / (d.ranks / groups);  // as MlaDecoder: heads split inside a group
      b.unit_begin = group * (g.latent / groups);
      b.unit_end = b.unit_begin + g.latent / groups;
      return b;
    }
    case DecodeSharding::kDecodeCp:
    case DecodeSharding::kMlaTp:
      b.unit_end = g.units();
      return b;
  }
  return b;
}

std::vector<KvBlock> decode_holdings(const KvGeometry& g, const DecodeLayout& d, int rank,
                                     int64_t tokens) {
  const KvBlock units = decode_units(g, d, rank);
  std::vector<KvBlock> out;
  if (tokens <= 0) return out;
  if (d.sharding != DecodeSharding::kDecodeCp) {
    out.push_back({0, tokens, units.unit_begin, units.unit_end, 0});
    return out;
  }
  const int64_t ps = g.page_size;
  for (int64_t page = rank; page * ps < tokens; page += d.ranks)
    out.push_back({page * ps, std::min(tokens, (page + 1) * ps), units.unit_begin, units.unit_end,
                   (page / d.ranks) * ps});
  return out;
}

int64_t decode_local_tokens(const KvGeometry& g, const DecodeLayout& d, int rank, int64_t tokens) {
  int64_t n = 0;
  for (const KvBlock& b : decode_holdings(g, d, rank, tokens)) n += b.tokens();
  return n;
}

int64_t decode_pages_needed(const KvGeometry& g, const DecodeLayout& d, int rank, int64_t tokens) {
  if (d.sharding != DecodeSharding::kDecodeCp) return (tokens + g.page_size - 1) / g.page_size;
  return parallel::decode_cp_local_pages(tokens, g.page_size, rank, d.ranks);
}

int64_t TransferPlan::segment_bytes(const TransferSegment& s) const {
  return s.block.tokens() * geometry.values_per_token(s.block.units()) *
         static_cast<int64_t>(dtype_size(geometry.dtype));
}

int64_t TransferPlan::bytes_to(int dst) const {
  int64_t n = 0;
  for (const TransferSegment& s : segments)
    if (s.dst == dst) n += segment_bytes(s);
  return n;
}

int64_t TransferPlan::bytes_from(int src) const {
  int64_t n = 0;
  for (const TransferSegment& s : segments)
    if (s.src == src) n += segment_bytes(s);
  return n;
}

int64_t TransferPlan::total_bytes() const {
  int64_t n = 0;
  for (const TransferSegment& s : segments) n += segment_bytes(s);
  return n;
}

std::vector<size_t> TransferPlan::message(int64_t layer, int src, int dst) const {
  std::vector<size_t> idx;
  for (size_t i = 0; i < segments.size(); ++i) {
    const TransferSegment& s = segments[i];
    if (s.layer == layer && s.src == src && s.dst == dst) idx.push_back(i);
  }
  return idx;
}

TransferPlan make_transfer_plan(const KvGeometry& g, const PrefillLayout& p, const DecodeLayout& d,
                                int64_t tokens) {
  validate_layouts(g, p, d);
  DISTATTN_CHECK(tokens >= 1, "make_transfer_plan: a request needs at least one token; got ",
                 tokens);
  TransferPlan plan;
  plan.geometry = g;
  plan.prefill = p;
  plan.decode = d;
  plan.tokens = tokens;

  // Source blocks of every prefill rank (what it may send). MLA: the latent is replicated on
  // every prefill rank, so token range i of P is sent by rank i (the sends are spread).
  std::vector<std::vector<KvBlock>> src_blocks(static_cast<size_t>(p.ranks));
  for (int i = 0; i < p.ranks; ++i) {
    if (g.family == ModelFamily::kMla) {
      const int64_t b = tokens * i / p.ranks, e = tokens * (i + 1) / p.ranks;
      if (b < e) src_blocks[static_cast<size_t>(i)].push_back({b, e, 0, g.latent, b});
    } else {
      src_blocks[static_cast<size_t>(i)] = prefill_holdings(g, p, i, tokens);
    }
  }

  std::vector<TransferSegment> layer0;
  for (int j = 0; j < d.ranks; ++j) {
    const KvBlock dst_units = decode_units(g, d, j);
    for (const KvBlock& need : decode_holdings(g, d, j, tokens)) {
      // Units of `need` per source: with replicated holdings (GQA heads held by several
      // prefill ranks) unit u goes to holder (u + j) % holders, so the decode ranks that need
      // the same head read it from different prefill ranks.
      for (int64_t u = need.unit_begin; u < need.unit_end;) {
        std::vector<int> holders;
        for (int i = 0; i < p.ranks; ++i)
          for (const KvBlock& s : src_blocks[static_cast<size_t>(i)])
            if (u >= s.unit_begin && u < s.unit_end) {
              holders.push_back(i);
              break;
            }
        DISTATTN_CHECK(!holders.empty(), "make_transfer_plan: no prefill rank holds unit ", u,
                       " (internal error)");
        const bool units_replicated_by_tokens =
            g.family == ModelFamily::kMla || p.sharding != PrefillSharding::kHeads;
        // Units handled together: for token-split sources every unit lives on every source,
        // so the whole unit range goes at once; for head-split sources, the run of units
        // with the same chosen holder.
        int64_t u_end = need.unit_end;
        int chosen = -1;
        if (!units_replicated_by_tokens) {
          chosen = holders[static_cast<size_t>((u + j) % static_cast<int64_t>(holders.size()))];
          const KvBlock& hb = src_blocks[static_cast<size_t>(chosen)].front();
          u_end = std::min(need.unit_end, hb.unit_end);
          // Stop the run where the holder choice would change.
          for (int64_t v = u + 1; v < u_end; ++v) {
            std::vector<int> hv;
            for (int i = 0; i < p.ranks; ++i) {
              const KvBlock& s = src_blocks[static_cast<size_t>(i)].front();
              if (v >= s.unit_begin && v < s.unit_end) hv.push_back(i);
            }
            if (hv[static_cast<size_t>((v + j) % static_cast<int64_t>(hv.size()))] != chosen) {
              u_end = v;
              break;
            }
          }
        }
        for (int i = 0; i < p.ranks; ++i) {
          if (chosen >= 0 && i != chosen) continue;
          for (const KvBlock& s : src_blocks[static_cast<size_t>(i)]) {
            const int64_t tb = std::max(need.token_begin, s.token_begin);
            const int64_t te = std::min(need.token_end, s.token_end);
            if (tb >= te) continue;
            TransferSegment seg;
            seg.layer = 0;
            seg.block = {tb, te, u, u_end, 0};
            seg.src = i;
            seg.dst = j;
            seg.src_row = s.local_begin + (tb - s.token_begin);
            seg.dst_row = need.local_begin + (tb - need.token_begin);
            seg.src_unit = u - s.unit_begin;
            seg.dst_unit = u - dst_units.unit_begin;
            layer0.push_back(seg);
          }
        }
        u = u_end;
      }
    }
  }
  std::sort(layer0.begin(), layer0.end(), [](const TransferSegment& a, const TransferSegment& b) {
    return std::tie(a.src, a.dst, a.block.token_begin, a.block.unit_begin) <
           std::tie(b.src, b.dst, b.block.token_begin, b.block.unit_begin);
  });
  plan.segments.reserve(layer0.size() * static_cast<size_t>(g.layers));
  for (int64_t l = 0; l < g.layers; ++l)
    for (TransferSegment s : layer0) {
      s.layer = l;
      plan.segments.push_back(s);
    }
  return plan;
}

int64_t expected_bytes_to(const KvGeometry& g, const DecodeLayout& d, int dst, int64_t tokens) {
  const int64_t elt = static_cast<int64_t>(dtype_size(g.dtype));
  const int64_t local = decode_local_tokens(g, d, dst, tokens);
  if (g.family == ModelFamily::kGqa) {
    const int64_t heads =
        d.sharding == DecodeSharding::kHeads ? decode_units(g, d, dst).units() : g.kv_heads;
    return g.layers * local * heads * (g.head_dim + g.head_dim_v) * elt;
  }
  const int64_t cols = d.sharding == DecodeSharding::kTpla ? g.latent / d.groups() : g.latent;
  return g.layers * local * (cols + g.rope) * elt;
}

}  // namespace distattn::serving
