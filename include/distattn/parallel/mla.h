#pragma once
// MLA (DeepSeek-V2/V3 multi-head latent attention) served three ways across the ranks of a
// tensor-parallel communicator (TP = its size). See docs/MLA.md for the math.
//
//   prefill    exact MLA, heads split over TP ranks; every rank produces the whole latent
//              cache (the latent does not depend on the head).
//   decode     weight absorption (q_lat = q_nope W_UK, o = W_UV o_lat), three shardings:
//     kMlaTp     heads split, cache replicated on every rank (exact baseline)
//     kTpla      latent split into g groups after an orthogonal rotation U; k_pe replicated;
//                per-shard softmax; all-reduce SUM of the projected outputs (approximate)
//     kDecodeCp  cache split by sequence (pages round-robin over ranks), exact LSE merge
//
// Conventions. Weights are fp32, row-major, "x W" (a row vector times the matrix):
//   w_dq  [hidden, q_lora]    (absent when q_lora_rank == 0: then c_q = x)
//   w_uq  [q_in, H*qk_nope]   w_qr [q_in, H*qk_rope]   (q_in = q_lora or hidden)
//   w_dkv [hidden, kv_lora]   w_kr [hidden, qk_rope]   gamma [kv_lora]
//   w_uk  [H, qk_nope, kv_lora]: k_nope[h] = w_uk[h] (gamma * c)
//   w_uv  [H, v_head, kv_lora]:  v[h]      = w_uv[h] (gamma * c)
//   w_o   [H*v_head, hidden]
// c_q is RMS-normalized (unit weight) before w_uq/w_qr. The cached latent c is
// RMSNorm(x w_dkv) WITHOUT gamma: gamma is folded into the absorbed up-projections, so the
// same cache feeds every sharding and the TPLA rotation. RoPE is the standard rotary
// embedding in "half-split" form: for i < d/2 the pair (v[i], v[i + d/2]) is rotated by
// angle pos * theta^(-2i/d).
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/mla.h"

namespace distattn::parallel {

struct MlaConfig {
  int64_t hidden = 7168;
  int64_t heads = 128;
  int64_t q_lora_rank = 1536;  // 0: no query compression
  int64_t kv_lora_rank = 512;
  int64_t qk_nope = 128;
  int64_t qk_rope = 64;
  int64_t v_head = 128;
  double rope_theta = 10000.0;
  float softmax_scale = 0.0f;  // 0: 1/sqrt(qk_nope + qk_rope); DeepSeek-V3 YaRN: 0.1352
  float rms_eps = 1e-6f;
  int64_t page_size = 64;

  float scale() const;
  // Throws naming the field to change (positive dims, even qk_rope, ...).
  void validate() const;
  std::string str() const;
};

// Full or head-sliced weights. Per-head tensors (w_uq, w_qr columns; w_uk, w_uv; w_o rows)
// hold heads [head_begin, head_begin + head_count); the rest is whole.
struct MlaWeights {
  int64_t head_begin = 0;
  int64_t head_count = 0;
  Tensor w_dq, w_uq, w_qr, w_dkv, w_kr, gamma, w_uk, w_uv, w_o;

  // Deterministic in (seed, tensor, global index): a rank generating heads [b, b+n) gets
  // exactly those heads of the full set. Entries ~ U(-1,1)*sqrt(3/fan_in); gamma in
  // [0.5, 1.5].
  static MlaWeights generate(const MlaConfig& cfg, uint64_t seed, int64_t head_begin = 0,
                             int64_t head_count = -1);
  // Reads w_dq.npy (when q_lora_rank > 0), w_uq.npy, w_qr.npy, w_dkv.npy, w_kr.npy,
  // gamma.npy, w_uk.npy, w_uv.npy, w_o.npy (fp32, full shapes as above) from directory `dir`
  // and keeps heads [head_begin, head_begin + head_count) (-1: to the last head).
  static MlaWeights load_npy(const MlaConfig& cfg, const std::string& dir, int64_t head_begin = 0,
                             int64_t head_count = -1);
  // Writes the same files; the weights must hold all heads.
  void save_npy(const MlaConfig& cfg, const std::string& dir) const;
  void check(const MlaConfig& cfg, int64_t need_begin, int64_t need_count) const;
};

// Paged latent cache of ONE sequence on this rank: rows [latent (Dl) | k_pe (Dr)].
// Pages are allocated up front for `capacity` tokens (page_table maps sequence page i to
// page id i). kv_memory_bytes() = num_pages * page_size * (Dl + Dr) * elt.
class MlaCache {
 public:
  MlaCache() = default;
  MlaCache(int64_t capacity, int64_t page_size, int64_t latent_dim, int64_t rope_dim, DType dtype);
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  int64_t latent_dim() const { return latent_dim_; }
  int64_t rope_dim() const { return rope_dim_; }
  int64_t page_size() const { return page_size_; }
  int64_t num_pages() const { return num_pages_; }
  DType dtype() const { return dtype_; }
  int64_t kv_memory_bytes() const;
  // Bytes one decode step reads: length * (Dl + Dr) * elt.
  int64_t kv_bytes_read() const;
  // Appends n rows: latent [n, Dl], rope [n, Dr] (fp32, packed), converting to dtype.
  void append(const float* latent, const float* rope, int64_t n);
  // fp32 copy of token t's row [Dl + Dr].
  void read_row(int64_t t, float* row) const;
  ops::MlaPagedCache view() const;
  const Tensor& pages() const { return pages_; }

 private:
  int64_t capacity_ = 0, page_size_ = 0, latent_dim_ = 0, rope_dim_ = 0, num_pages_ = 0;
  int64_t length_ = 0;
  DType dtype_ = DType::kFloat32;
  Tensor pages_, page_table_, seq_lens_;
};

// ---- prefill ---------------------------------------------------------------------------

struct MlaPrefillResult {
  Tensor y;        // fp32 [S, hidden], identical on every rank (after the W_O all-reduce)
  MlaCache cache;  // the whole sequence's latent cache (normalized c, RoPE'd k_pe)
};
// Exact MLA prefill of x [S, hidden] (fp32, replicated on every rank; positions 0..S-1),
// heads split evenly over tp (heads % tp.size() == 0). `weights` must hold this rank's heads
// [rank*H/TP, (rank+1)*H/TP). The cache gets `capacity` >= S tokens of room.
MlaPrefillResult mla_prefill_tp(const MlaConfig& cfg, const MlaWeights& weights,
                                const TensorView& x, comm::Communicator& tp, int64_t capacity,
                                DType cache_dtype = DType::kFloat32);

// ---- TPLA reparameterization -----------------------------------------------------------

enum class MlaSharding { kMlaTp, kTpla, kDecodeCp };
enum class TplaRotation { kNone, kHadamard, kPca };
enum class TplaNorm { kSliced, kExact };
const char* sharding_name(MlaSharding s);   // "mla-tp", "tpla", "decode-cp"
const char* rotation_name(TplaRotation r);  // "none", "hadamard", "pca"
const char* norm_name(TplaNorm n);          // "sliced", "exact"
MlaSharding parse_sharding(const std::string& s);
TplaRotation parse_rotation(const std::string& s);
TplaNorm parse_norm(const std::string& s);

// Offline reparameterization of one layer for g latent groups: orthogonal U (latent space,
// row-vector convention: c_hat = c U) and per-shard logit scales mu[g].
struct TplaReparam {
  int64_t latent = 0;
  int groups = 1;
  TplaRotation rotation = TplaRotation::kNone;
  std::vector<float> signs;         // Hadamard: the random +-1 diagonal D (U = D H / sqrt(d))
  std::vector<double> u;            // dense U [latent, latent] (identity for kNone)
  std::vector<float> mu;            // [groups]
  std::vector<double> eigenvalues;  // PCA: sorted descending (diagnostics)

  // rows [n, latent] fp32 <- rows U (fast transform for Hadamard).
  void rotate_rows(float* rows, int64_t n) const;
  int64_t slice_width() const { return latent / groups; }
};

// Builds U for `rotation` (Hadamard signs from `seed`; PCA from the second-moment matrix of
// the calibration latents, eigenvectors by descending eigenvalue, Jacobi eigensolver) and
// calibrates mu: for shard i, the least-squares fit of the full latent logit by the shard's
// latent logit, mu_i = sum(a_i * a) / sum(a_i^2) over calibration (query, key) pairs, with
// a_i = q_hat_i . c_hat_i and a = sum_j a_j = q . c. Without calibration queries mu = 1.
//   calib_latents [n, latent] normalized latents (needed for kPca); calib_qlat [m, latent]
//   absorbed queries q_nope W_UK diag(gamma) in the unrotated space.
TplaReparam make_tpla_reparam(int64_t latent, int groups, TplaRotation rotation, uint64_t seed,
                              const float* calib_latents = nullptr, int64_t n_latents = 0,
                              const float* calib_qlat = nullptr, int64_t n_queries = 0);

// (Re)fits rp.mu for rp.groups shards with rp.u / rp.signs kept (make_tpla_reparam's fit,
// above; it calls this). A rotation does not depend on g, so one U can be regrouped for
// several g. Without calibration data, or for one group, mu = 1.
void calibrate_tpla_mu(TplaReparam& rp, const float* calib_latents, int64_t n_latents,
                       const float* calib_qlat, int64_t n_queries);

// TPLA's RMSNorm of one decode token's cached latent slice, in place (what MlaDecoder
// stores). slice [w] = this group's slice of (x W_DKV) U, not yet normalized. kSliced
// divides by the slice's own RMS sqrt(|slice|^2 / w + eps); kExact by the whole latent's,
// sqrt(full_sum_sq / latent + eps), where full_sum_sq = |x W_DKV|^2 (MlaDecoder all-reduces
// the slices' sums of squares: one scalar per token).
void tpla_normalize_slice(float* slice, int64_t w, TplaNorm norm, double full_sum_sq,
                          int64_t latent, float eps);

// One TPLA shard's decode attention with the per-shard softmax (MlaDecoder's core on a
// rank of latent group `group`): ops::mla_decode with latent_logit_scale = rp.mu[group],
// i.e. logits mu_i * scale * q_hat_i . c_hat_i + scale * q_pe . k_pe.
//   q_lat [B, H, Dl/g]: the group's slice of the rotated absorbed queries q_lat U
//   shard: reshard_to_tpla's cache (+ decode tokens normalized by tpla_normalize_slice)
//   out [B, H, Dl/g] = P_i c_hat_i, lse [B, H]; opts.latent_logit_scale is overwritten.
void tpla_shard_attention(const TplaReparam& rp, int group, const TensorView& q_lat,
                          const TensorView& q_pe, const ops::MlaPagedCache& shard,
                          const TensorView& out, const TensorView& lse, ops::MlaDecodeOptions opts);

// Symmetric eigensolver (cyclic Jacobi), fp64, for the offline PCA. a [n, n] row-major
// symmetric (destroyed). Returns eigenvalues descending; vectors [n, n] with eigenvector k
// in COLUMN k. Converges to ~1e-12 relative off-diagonal mass; throws after 100 sweeps.
std::vector<double> symmetric_eigen(std::vector<double>& a, int64_t n,
                                    std::vector<double>& vectors);

// ---- resharding (prefill cache -> decode shards) ----------------------------------------

// TPLA shard `group` of g: every token's latent rotated by U then sliced to columns
// [group*Dl/g, (group+1)*Dl/g); k_pe copied. Same page size and dtype.
MlaCache reshard_to_tpla(const MlaCache& full, const TplaReparam& rp, int group, int64_t capacity);
// decode-CP shard of `rank` of `ranks`: the sequence's pages p with p % ranks == rank, in
// order (round-robin pages). capacity is the sequence capacity (global tokens).
MlaCache reshard_to_decode_cp(const MlaCache& full, int rank, int ranks, int64_t capacity);
// Pages of a sequence of `capacity` tokens that rank `rank` of `ranks` holds under decode-CP.
int64_t decode_cp_local_pages(int64_t capacity, int64_t page_size, int rank, int ranks);

// ---- decode ----------------------------------------------------------------------------

struct MlaDecodeSetup {
  MlaSharding sharding = MlaSharding::kMlaTp;
  int tpla_groups = 0;  // g; 0 = TP. TP % g == 0; heads split TP/g ways inside a group
  TplaNorm tpla_norm = TplaNorm::kExact;
  // Test mode: all-reduce the partial latent logits before one global softmax (the value
  // path stays sharded). Exact MLA up to rounding, for any rotation.
  bool tpla_global_softmax = false;
  DType cache_dtype = DType::kFloat32;
  int64_t capacity = 0;  // tokens the sequence may reach (prefill + decode)
};

// One rank's decode weights of an MLA layer under a sharding (what MlaDecoder and the serving
// engine's batched decode use): the heads it attends and projects, its latent width, and the
// absorbed projections (for TPLA also rotated by U and sliced to its latent group).
// Validates the sharding against (rank, ranks) before building; `weights` must hold the
// attended heads. `reparam` is required for kTpla and ignored otherwise.
struct MlaRankWeights {
  int64_t attn_h0 = 0, attn_hn = 0;  // heads attended here
  int64_t proj_h0 = 0, proj_hn = 0;  // heads projected (W_UV, W_O) here, inside the attended
  int64_t dl = 0;                    // latent width stored and attended here
  int group = 0, groups = 1;         // TPLA: this rank's latent group, and g
  Tensor w_dq;                       // [hidden, q_lora] (when q_lora_rank > 0)
  Tensor w_uq;                       // [q_in, attn_hn*nope]
  Tensor w_qr;                       // [q_in, attn_hn*rope]
  Tensor w_dkv;                      // [hidden, dl]   (rotated + sliced for TPLA)
  Tensor w_kr;                       // [hidden, rope]
  Tensor wuk;                        // [attn_hn, nope, dl]   W_UK[h] diag(gamma) U[:, slice]
  Tensor wuv;                        // [proj_hn, v_head, dl] W_UV[h] diag(gamma) U[:, slice]
  Tensor w_o;                        // [proj_hn*v_head, hidden]
};
MlaRankWeights make_mla_rank_weights(const MlaConfig& cfg, const MlaWeights& weights,
                                     const MlaDecodeSetup& setup, int rank, int ranks,
                                     const TplaReparam* reparam = nullptr);

// One decode step of an MLA attention layer for a batch of sequences on this rank, the batched
// form of MlaDecoder::step (which also holds the cache): computes every sequence's new latent
// row and stores it where this rank holds the token, attends this rank's cache shard under
// setup.sharding, projects, and all-reduces over `tp`. setup.tpla_global_softmax is not
// supported here.
//   x          fp32 [B, hidden]: the layer's (normalized) input, one row per sequence
//   positions  [B]: position of each sequence's new token (RoPE)
//   append_rows [B]: row (page * page_size + slot) of cache.pages for the new token, or -1
//              when another rank stores it (decode-CP)
//   cache      this rank's pages [num_pages, page_size, dl + rope]; page_table [B, max] and
//              seq_lens [B] (tokens held here, counting the new one)
//   latent_comm TPLA with g > 1 and exact RMSNorm: the ranks of the other latent groups that
//              share this rank's heads (as MlaDecoder builds it); else unused (may be null)
//   y          fp32 [B, hidden] out (identical on every rank of tp)
struct MlaStepArgs {
  TensorView x;
  std::span<const int64_t> positions;
  std::span<const int64_t> append_rows;
  ops::MlaPagedCache cache;
  TensorView y;
};
void mla_decode_step(const MlaConfig& cfg, const MlaRankWeights& w, const MlaDecodeSetup& setup,
                     const TplaReparam* reparam, comm::Communicator& tp,
                     comm::Communicator* latent_comm, const MlaStepArgs& args);

// One rank's decoder of one sequence. Collective: construct, load_prefill and step on every
// rank of `tp` together.
class MlaDecoder {
 public:
  // `weights` must hold the heads this rank needs (all heads is always enough).
  // `reparam` is required for kTpla (groups must match), ignored otherwise.
  MlaDecoder(const MlaConfig& cfg, const MlaWeights& weights, const MlaDecodeSetup& setup,
             std::shared_ptr<comm::Communicator> tp, const TplaReparam* reparam = nullptr);
  ~MlaDecoder();
  MlaDecoder(const MlaDecoder&) = delete;
  MlaDecoder& operator=(const MlaDecoder&) = delete;

  // Takes this rank's shard of a prefill cache (the whole sequence's cache, e.g.
  // mla_prefill_tp's) through the resharding helpers.
  void load_prefill(const MlaCache& full);
  // One decode token: x [hidden] fp32 at position length(); appends its latent, attends,
  // projects. y [hidden] (identical on every rank).
  void step(const float* x, float* y);

  int64_t length() const { return length_; }
  const MlaCache& cache() const { return cache_; }
  int heads_begin() const { return static_cast<int>(head_begin_); }
  int heads_local() const { return static_cast<int>(head_count_); }
  int64_t latent_local() const { return latent_local_; }
  int group() const { return group_; }
  int groups() const { return groups_; }
  // Formulas (asserted by the tests against the cache and the ledger):
  //   KV bytes this rank reads in a step at context `len`, and the bytes its cache holds.
  static int64_t kv_bytes_read_formula(const MlaConfig& cfg, MlaSharding s, int tp, int groups,
                                       int rank, int64_t len, DType dtype);
  static int64_t kv_memory_formula(const MlaConfig& cfg, MlaSharding s, int tp, int groups,
                                   int rank, int64_t capacity, DType dtype);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  MlaCache cache_;
  int64_t length_ = 0, head_begin_ = 0, head_count_ = 0, latent_local_ = 0;
  int group_ = 0, groups_ = 1;
};

// decode-CP attention core: ops::mla_decode on the local shard, all-gather of the fp32
// partials (out [B,H,Dl] and lse [B,H]) over `cp`, LSE merge in rank order with
// ops::attention_merge. out/lse are the merged, identical on every rank.
void decode_cp_attention(comm::Communicator& cp, const TensorView& q_lat, const TensorView& q_pe,
                         const ops::MlaPagedCache& local, const TensorView& out,
                         const TensorView& lse, const ops::MlaDecodeOptions& opts);

// ---- fp64 reference --------------------------------------------------------------------

struct MlaReference {
  std::vector<double> y;       // [S, hidden]
  std::vector<double> latent;  // [S, kv_lora] normalized c (no gamma)
  std::vector<double> k_pe;    // [S, qk_rope] after RoPE
};
// Naive fp64 causal MLA over x [S, hidden] (positions 0..S-1) with FULL weights and no
// absorption (explicit K = [w_uk (gamma c) | k_pe], V = w_uv (gamma c)): row t of y is also
// the output of decoding token t after tokens 0..t-1.
MlaReference mla_reference_forward(const MlaConfig& cfg, const MlaWeights& full, const float* x,
                                   int64_t seq);

// Absorbed, unrotated latent queries q_nope[h] W_UK[h] diag(gamma) of every head for the
// tokens x [n, hidden] at positions 0..n-1: [n * H, kv_lora] fp32 (TPLA calibration input).
std::vector<float> mla_absorbed_queries(const MlaConfig& cfg, const MlaWeights& full,
                                        const float* x, int64_t n);

}  // namespace distattn::parallel
