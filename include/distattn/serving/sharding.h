#pragma once
// How the prefill group and the decode group hold a request's KV cache, and the transfer
// plan that moves it from one sharding to the other (DESIGN.md "Disaggregated
// prefill/decode"; docs/SERVING.md).
//
// One layer's KV of a request of L tokens is a rectangle  tokens [0, L) x units  where a
// unit is a KV head (GQA: K [L, Hkv, D] and V [L, Hkv, Dv]) or one column of the MLA latent
// (MLA: rows [L, latent] plus the k_pe rows [L, rope], which travel with every latent range).
// Each side's ShardMap says which rectangles each of its ranks holds; the plan cuts the
// decode side's needs into segments, each served by one prefill rank that holds it.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "distattn/core/dtype.h"
#include "distattn/parallel/mla.h"
#include "distattn/parallel/sequence_parallel.h"

namespace distattn::serving {

enum class ModelFamily { kGqa, kMla };
const char* family_name(ModelFamily f);           // "gqa", "mla"
ModelFamily parse_family(std::string_view name);  // throws listing the names

// Prefill shardings: the existing strategies (GQA); MLA prefill is always kHeads (exact MLA,
// heads split, the latent replicated on every prefill rank).
enum class PrefillSharding { kHeads, kZigzag, kUlysses, kHybrid };
// Decode shardings. GQA: kHeads | kDecodeCp. MLA: kMlaTp | kTpla | kDecodeCp.
enum class DecodeSharding { kHeads, kDecodeCp, kMlaTp, kTpla };
const char* prefill_sharding_name(PrefillSharding s);  // "heads", "zigzag", "ulysses", "hybrid"
const char* decode_sharding_name(DecodeSharding s);    // "heads", "decode-cp", "mla-tp", "tpla"
PrefillSharding parse_prefill_sharding(std::string_view name);
DecodeSharding parse_decode_sharding(std::string_view name);

// The KV geometry both sides must agree on (the handshake compares it field by field).
struct KvGeometry {
  ModelFamily family = ModelFamily::kGqa;
  int64_t layers = 1;
  int64_t heads = 1;     // query heads (GQA: the head-parallel KV split follows the query split)
  int64_t kv_heads = 1;  // GQA
  int64_t head_dim = 64;
  int64_t head_dim_v = 64;
  int64_t latent = 512;  // MLA
  int64_t rope = 64;     // MLA
  DType dtype = DType::kFloat32;
  int64_t page_size = 16;

  int64_t units() const { return family == ModelFamily::kGqa ? kv_heads : latent; }
  // Values of one token and layer for `units` units (GQA: K and V; MLA: the latent columns
  // plus the whole k_pe).
  int64_t values_per_token(int64_t units) const {
    return family == ModelFamily::kGqa ? units * (head_dim + head_dim_v) : units + rope;
  }
};

struct PrefillLayout {
  PrefillSharding sharding = PrefillSharding::kHeads;
  int ranks = 1;
  int ulysses = 1;  // kHybrid: Ulysses degree (ring degree = ranks / ulysses)
  // Sequence length the prefill pads a prompt of `tokens` to (a multiple of 2P for zigzag,
  // 2RU for hybrid, P for Ulysses; the padding sits at the end, after every real token, so
  // causal attention of the real tokens is exact).
  int64_t padded_length(int64_t tokens) const;
  parallel::SpLayout sp_layout() const;
};

struct DecodeLayout {
  DecodeSharding sharding = DecodeSharding::kHeads;
  int ranks = 1;
  int tpla_groups = 0;  // TPLA: latent groups g (0 = ranks); ranks % g == 0
  int groups() const { return tpla_groups > 0 ? tpla_groups : ranks; }
};

// A rectangle of one layer's KV. `local_begin`: where token_begin sits in the holder's own
// storage (prefill: the row of its local K/V tensors; decode: the index among the tokens it
// stores, which maps to its pages).
struct KvBlock {
  int64_t token_begin = 0, token_end = 0;
  int64_t unit_begin = 0, unit_end = 0;
  int64_t local_begin = 0;
  int64_t tokens() const { return token_end - token_begin; }
  int64_t units() const { return unit_end - unit_begin; }
};

// What rank `rank` holds on the prefill side for a prompt of `tokens` tokens: blocks in its
// local row order (sequence shardings: token runs in token_positions() order; kHeads: one
// block of its KV heads; MLA: the whole latent, replicated).
std::vector<KvBlock> prefill_holdings(const KvGeometry& g, const PrefillLayout& p, int rank,
                                      int64_t tokens);
// What decode rank `rank` stores of a request of `tokens` tokens, in its local token order:
// kHeads: its KV heads (replicated when Hkv < D); kDecodeCp: the pages p with p % D == rank;
// kMlaTp: the whole latent; kTpla: the latent columns of its group (rotated space).
std::vector<KvBlock> decode_holdings(const KvGeometry& g, const DecodeLayout& d, int rank,
                                     int64_t tokens);
// Units (KV heads or latent columns) decode rank `rank` stores for every token it holds.
KvBlock decode_units(const KvGeometry& g, const DecodeLayout& d, int rank);
// Tokens of a request of `tokens` tokens that decode rank `rank` stores (all, or its pages).
int64_t decode_local_tokens(const KvGeometry& g, const DecodeLayout& d, int rank, int64_t tokens);
// Pages decode rank `rank` needs for a request whose prompt + output is `tokens` tokens.
int64_t decode_pages_needed(const KvGeometry& g, const DecodeLayout& d, int rank, int64_t tokens);

// One segment of the plan: `block` of layer `layer` goes from prefill rank `src` to decode
// rank `dst` (ranks within their groups).
// src_row / dst_row: local position of block.token_begin on each side (KvBlock::local_begin);
// src_unit / dst_unit: block.unit_begin relative to the first unit each side stores.
struct TransferSegment {
  int64_t layer = 0;
  KvBlock block;
  int src = 0;
  int dst = 0;
  int64_t src_row = 0, dst_row = 0;
  int64_t src_unit = 0, dst_unit = 0;
};

// The transfer plan of one request. Segments are ordered by (layer, src, dst, token, unit);
// the segments of one (layer, src, dst) form one message, their payloads back to back.
struct TransferPlan {
  KvGeometry geometry;
  PrefillLayout prefill;
  DecodeLayout decode;
  int64_t tokens = 0;
  std::vector<TransferSegment> segments;

  // Payload bytes of a segment: tokens x values_per_token(units) x dtype size.
  int64_t segment_bytes(const TransferSegment& s) const;
  // Bytes decode rank `dst` receives (over every layer), and prefill rank `src` sends.
  int64_t bytes_to(int dst) const;
  int64_t bytes_from(int src) const;
  int64_t total_bytes() const;
  // Indices into `segments` of the message (layer, src, dst), in payload order.
  std::vector<size_t> message(int64_t layer, int src, int dst) const;
};

// The plan for a request of `tokens` tokens. Sources are chosen so that every decode rank's
// needs are covered exactly once; replicated holdings (GQA KV heads when Hkv < P, the MLA
// latent) are spread over the prefill ranks that hold them (MLA: token range i of P from
// prefill rank i). Throws when the layouts cannot be combined (e.g. an MLA plan with a
// GQA decode sharding).
TransferPlan make_transfer_plan(const KvGeometry& g, const PrefillLayout& p, const DecodeLayout& d,
                                int64_t tokens);

// The same byte counts from closed-form formulas (what the tests compare the plan and the
// ledger with): bytes decode rank `dst` receives for a request of `tokens` tokens.
//   GQA kHeads:    layers * tokens * hkv(dst) * (D + Dv) * elt
//   GQA decode-cp: layers * local_tokens(dst) * Hkv * (D + Dv) * elt
//   MLA mla-tp:    layers * tokens * (latent + rope) * elt     (576 values)
//   MLA tpla:      layers * tokens * (latent / g + rope) * elt  (320 at g = 2)
//   MLA decode-cp: layers * local_tokens(dst) * (latent + rope) * elt
int64_t expected_bytes_to(const KvGeometry& g, const DecodeLayout& d, int dst, int64_t tokens);

void validate_layouts(const KvGeometry& g, const PrefillLayout& p, const DecodeLayout& d);

}  // namespace distattn::serving
