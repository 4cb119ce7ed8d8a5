#pragma once
// The serving layer's synthetic transformer: real compute on random weights derived from a
// seed (no weights can be downloaded here), so prefill, transfer and decode do the work a
// real model does. Every rank generates exactly the slice of each weight it needs, as a pure
// function of (seed, layer, tensor, global index), so all ranks derive the same model.
//
//   embedding [vocab, hidden] -> L x ( RMSNorm -> attention -> output projection -> residual
//                                      RMSNorm -> SiLU-gated MLP [hidden, ffn]  -> residual )
//   -> final RMSNorm -> LM head [hidden, vocab] -> greedy argmax
//
// Attention families:
//   kGqa (Llama-like): fused QKV projection, half-split RoPE on q and k, GQA attention.
//   kMla (DeepSeek-style): parallel::MlaWeights per layer; prefill is exact MLA
//        (parallel::mla_prefill_tp), decode uses weight absorption under mla-tp, tpla or
//        decode-cp (parallel::mla_decode_step).
//
// Dense math is fp32 (ops::matmul); ModelConfig::dtype is the storage type of q/k/v, the
// attention inputs and the KV cache (what is transferred).
//
// Tensor parallelism of the dense parts: a RankSlice says which heads and MLP columns a rank
// holds; when it holds a part (head-parallel prefill, every decode sharding), the output
// projection and the MLP down projection give partial sums that are all-reduced over the
// group (Megatron-style row parallelism). Sequence-parallel prefill (zigzag, ulysses,
// hybrid) holds the whole model on every rank and runs the dense parts on its own tokens.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "distattn/comm/communicator.h"
#include "distattn/comm/mesh.h"
#include "distattn/core/tensor_view.h"
#include "distattn/parallel/mla.h"
#include "distattn/parallel/sequence_parallel.h"
#include "distattn/serving/kv_pool.h"
#include "distattn/serving/sharding.h"
#include "distattn/serving/transfer.h"

namespace distattn::serving {

struct ModelConfig {
  ModelFamily family = ModelFamily::kGqa;
  int64_t hidden = 1024;
  int64_t heads = 16;
  int64_t kv_heads = 4;   // GQA
  int64_t head_dim = 64;  // GQA (q, k and v)
  int64_t layers = 4;
  int64_t ffn = 2816;
  int64_t vocab = 4096;
  DType dtype = DType::kFloat32;
  uint64_t seed = 1;
  double rope_theta = 10000.0;
  float rms_eps = 1e-5f;
  // MLA (DeepSeek-V3's per-head dims, fewer heads): latent c 512 + k_pe 64, q_nope 128, v 128;
  // mla_q_lora 0 = no query compression.
  int64_t mla_latent = 512;
  int64_t mla_rope = 64;
  int64_t mla_nope = 128;
  int64_t mla_v = 128;
  int64_t mla_q_lora = 0;

  // GQA: hidden 1024, heads 16, kv-heads 4, head-dim 64. MLA: hidden 1024, heads 8.
  static ModelConfig defaults(ModelFamily family);
  // Throws naming the flag to change.
  void validate() const;
  parallel::MlaConfig mla(int64_t page_size) const;
  KvGeometry geometry(int64_t page_size) const;
  std::string str() const;
};

// The heads and MLP columns a rank holds (ranges of the full model).
struct RankSlice {
  parallel::HeadRange attn_heads;  // query heads it computes q and attention for
  parallel::HeadRange kv_heads;    // GQA KV heads it computes k, v for
  parallel::HeadRange proj_heads;  // heads of the output projection rows it holds
  parallel::HeadRange ffn;         // MLP columns
  bool reduce = false;             // output and MLP projections are partial: all-reduce them

  static RankSlice full(const ModelConfig& cfg);
  // Heads, KV heads (replicated when Hkv < ranks) and MLP columns split over `ranks`.
  static RankSlice head_parallel(const ModelConfig& cfg, int rank, int ranks);
  // decode-CP: every rank attends all heads over its part of the cache; the projections and
  // the MLP are split over the ranks.
  static RankSlice cache_parallel(const ModelConfig& cfg, int rank, int ranks);
  // TPLA with `groups` latent groups: heads split ranks/groups ways inside a group (g = ranks:
  // every rank has every head); the MLP split over all ranks.
  static RankSlice tpla(const ModelConfig& cfg, int rank, int ranks, int groups);
};

struct LayerWeights {
  Tensor attn_norm, mlp_norm;  // fp32 [hidden]
  // GQA
  Tensor w_qkv;  // [hidden, (attn_heads + 2 * kv_heads) * head_dim]: q | k | v columns
  Tensor w_o;    // [proj_heads * head_dim, hidden]
  // MLA: the layer's weights for attn_heads (parallel::MlaWeights conventions)
  parallel::MlaWeights mla;
  // MLP
  Tensor w_gate_up;  // [hidden, 2 * ffn cols]: gate | up
  Tensor w_down;     // [ffn cols, hidden]
};

struct ModelWeights {
  ModelConfig config;
  RankSlice slice;
  Tensor embed;       // [vocab, hidden]
  Tensor final_norm;  // [hidden]
  Tensor lm_head;     // [hidden, vocab]
  std::vector<LayerWeights> layers;

  // Generated on the host, then copied to `device` (GQA; MLA weights stay on the host).
  static ModelWeights generate(const ModelConfig& cfg, const RankSlice& slice,
                               Device device = Device::cpu());
  // The seed of layer `layer`'s parallel::MlaWeights.
  static uint64_t layer_seed(const ModelConfig& cfg, int64_t layer);
};

// ---- prefill ---------------------------------------------------------------------------

// Called with each layer's KV as soon as the layer's QKV projection is done (before its
// attention), so the transfer of layer l overlaps the compute of l and later layers:
//   GQA: k [rows, kv_heads, D], v [rows, kv_heads, Dv] in cfg.dtype, this rank's local rows
//        (sequence shardings: token_positions() order; padding rows at the end are included)
//   MLA: k = rows [tokens, latent + rope] fp32 (normalized latent | RoPE'd k_pe), v empty
// The views are valid during the call; `owners` keep their memory alive for longer (a send
// from it still in flight).
struct LayerKv {
  LayerKvView view;
  Tensor owner_k, owner_v;
};
using KvSink = std::function<void(int64_t layer, const LayerKv& kv)>;

struct PrefillHooks {
  // Called on every rank at the start of each layer. An exception thrown here on ANY rank
  // fails the request on every rank of the group (a status all-reduce per layer, before the
  // layer's collectives), with the message naming the rank: fault containment for local
  // failures, and the fault injection point of the tests.
  std::function<void(int64_t layer)> before_layer;
  // Called between the steps of a layer (drives the KV transfer's progress).
  std::function<void()> progress;
  // Called with each layer's normalized attention input [rows, hidden] (TPLA calibration).
  std::function<void(int64_t layer, const TensorView& h)> on_layer_input;
};

// A request failed on a rank of a group (not a communication failure): the other requests
// go on.
class RequestFailure : public Error {
 public:
  explicit RequestFailure(const std::string& why) : Error(Status::kRemoteError, why) {}
};

struct PrefillOutput {
  int32_t first_token = 0;
  std::vector<float> last_hidden;  // [hidden] final-normed hidden of the last prompt token
  std::vector<float> all_hidden;   // [tokens, hidden] when asked (single-rank reference only)
};

class PrefillModel {
 public:
  // Collective over `group` (its ranks must pass equal arguments). `group` must accept the
  // weights' device memory (host: MPI). `host` (optional, else `group`) carries the small
  // host-memory control values (status flags, the first token).
  // `device`: where weights and activations live (GQA on CUDA needs a `group` that accepts
  // device memory; MLA prefill is host-only).
  PrefillModel(const ModelConfig& cfg, const PrefillLayout& layout,
               std::shared_ptr<comm::Communicator> group,
               std::shared_ptr<comm::Communicator> host = nullptr, Device device = Device::cpu());
  ~PrefillModel();

  // Exact causal prefill of `tokens` (every rank passes the whole prompt). The group pads
  // it as PrefillLayout::padded_length says; `sink` gets every layer's KV. all_hidden (a
  // one-rank group only: the single-rank reference of --check, fed the prompt and the
  // generated tokens, teacher forcing) also returns every position's final-normed hidden.
  PrefillOutput run(std::span<const int32_t> tokens, const KvSink& sink,
                    const PrefillHooks& hooks = {}, bool all_hidden = false);

  const ModelWeights& weights() const { return weights_; }
  const PrefillLayout& layout() const { return layout_; }

 private:
  ModelConfig cfg_;
  PrefillLayout layout_;
  Device device_;
  std::shared_ptr<comm::Communicator> group_, host_;
  std::unique_ptr<comm::DeviceMesh> mesh_;  // hybrid
  parallel::SpGroup sp_;
  ModelWeights weights_;
};

// ---- decode ----------------------------------------------------------------------------

struct DecodeSetup {
  DecodeLayout layout;
  parallel::TplaRotation rotation = parallel::TplaRotation::kHadamard;
  parallel::TplaNorm norm = parallel::TplaNorm::kExact;
  int64_t page_size = 16;
  int64_t calib_tokens = 64;  // TPLA: tokens of the calibration prompt (PCA and mu)
};

// TPLA's per-layer reparameterization (rotation U and logit scales mu), derived from the
// seed and a calibration prompt generated from it, so that the prefill side (which rotates
// the latents it sends) and the decode side derive the same one independently; the
// handshake compares their hashes.
// `self`: a one-rank communicator (the calibration forward runs on this rank alone).
std::vector<parallel::TplaReparam> make_tpla_reparams(const ModelConfig& cfg,
                                                      const DecodeSetup& setup,
                                                      std::shared_ptr<comm::Communicator> self);
// FNV-1a over the rotation (U as fp32) and mu of every layer: the handshake's rotation id.
uint64_t reparam_hash(std::span<const parallel::TplaReparam> reparams);

// One decode step's batch, as the engine builds it for this rank.
struct DecodeBatch {
  std::vector<int32_t> tokens;       // [B] each sequence's newest token
  std::vector<int64_t> positions;    // [B] its position (= tokens before it)
  std::vector<int64_t> append_rows;  // [B] pool row (page * page_size + slot) where this rank
                                     //     stores the new token's KV; -1: another rank does
  Tensor page_table;                 // int32 [B, max_pages]: the pages this rank holds
  Tensor seq_lens;                   // int32 [B]: tokens this rank holds, after the append
  int64_t size() const { return static_cast<int64_t>(tokens.size()); }
};

struct DecodeOutput {
  std::vector<int32_t> next_tokens;  // [B]
  std::vector<float> hidden;         // [B, hidden] final-normed (what --check compares)
};

class DecodeModel {
 public:
  // Collective over `group` (the decode group). `reparams`: TPLA only (one per layer).
  // `device` as PrefillModel (the pool passed to step() must live there too).
  DecodeModel(const ModelConfig& cfg, const DecodeSetup& setup,
              std::shared_ptr<comm::Communicator> group,
              std::vector<parallel::TplaReparam> reparams = {}, Device device = Device::cpu());
  ~DecodeModel();

  // Units (KV heads or latent columns) this rank's pool must store.
  int64_t pool_units() const;
  // One batched step over `pool`; collective over the group. `progress` is called between
  // layers (it drives the KV transfers of requests that have not joined yet).
  DecodeOutput step(const DecodeBatch& batch, KvPool& pool,
                    const std::function<void()>& progress = {});

  const ModelWeights& weights() const { return weights_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  ModelWeights weights_;
};

}  // namespace distattn::serving
