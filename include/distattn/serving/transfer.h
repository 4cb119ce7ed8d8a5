#pragma once
// Wire format of the KV transfer and the two ends of resharding in transit: a prefill rank
// sends the segments of one (layer, src, dst) message of a request's TransferPlan from its own
// KV layout; the decode rank checks the header and lands the payload in the pages it reserved
// for the request, in its own layout (serving/sharding.h, serving/kv_pool.h).
//
// A message is a sequence of parts, each sent and received as one point-to-point transfer of
// exactly its size (so the same sizes work on MPI and NCCL):
//   part 0: the 32-byte MessageHeader
//   then per segment, in plan order:
//     GQA: K [tokens, units, D] and V [tokens, units, Dv]   (dtype of the geometry)
//     MLA: rows [tokens, units + rope]: the latent columns, then k_pe
// Each end decides for itself how a part touches its memory: where the part is one
// contiguous run of its own tensors in the wire dtype (a whole KV head range of a token run;
// consecutive pages of the pool) it is sent from / received into that memory directly (zero
// copy); otherwise it is packed into / unpacked from a staging buffer (the resharding cases:
// head subsets, scattered pages, dtype conversion, TPLA's rotated slices).
// The header names request, layer, src and dst: a message that arrives where another was
// expected (a channel out of order) is an error, never silently wrong KV.
#include <cstdint>
#include <span>
#include <vector>

#include "distattn/core/tensor_view.h"
#include "distattn/serving/kv_pool.h"
#include "distattn/serving/sharding.h"

namespace distattn::serving {

struct MessageHeader {
  uint32_t magic = 0;
  uint32_t layer = 0;
  int64_t request = 0;
  int32_t src = 0;
  int32_t dst = 0;
  int64_t payload_bytes = 0;
};
static_assert(sizeof(MessageHeader) == 32);
constexpr uint32_t kMessageMagic = 0xD1A77E57u;
// A filler: same parts and header fields, sent for the layers a request that failed after its
// grant never produced, so the channel stays in order; the receiver discards it.
constexpr uint32_t kFillerMagic = 0xF111E4D0u;

// One part of a message.
struct MessagePart {
  enum class Kind { kHeader, kKeys, kValues, kRows };
  Kind kind = Kind::kHeader;
  size_t segment = 0;  // index into plan.segments (payload parts)
  int64_t bytes = 0;
};
// The parts of the message made of plan.segments[segs] (one layer, src and dst), header first.
std::vector<MessagePart> message_parts(const TransferPlan& plan, std::span<const size_t> segs);
// Bytes of the whole message (header included).
int64_t message_bytes(const TransferPlan& plan, std::span<const size_t> segs);

// The prefill rank's KV of one layer, as the model's KvSink hands it over (serving/model.h):
//   GQA: k [rows, units, D], v [rows, units, Dv] in the geometry's dtype (this rank's rows)
//   MLA: k = rows [tokens, latent + rope] in any float dtype (TPLA: already rotated); v unused
struct LayerKvView {
  TensorView k, v;
};

void write_header(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  uint32_t magic, const TensorView& out);
// Checks a received header against (request, layer, src, dst) of `segs` (Error kInternal
// naming both on a mismatch). Returns false for a filler.
bool check_header(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  const TensorView& in);

// Sender: the part's bytes inside `kv` when they are one contiguous run in the wire dtype (send
// them as they are), else a view without data (pack_part into a buffer instead).
TensorView source_bytes(const TransferPlan& plan, const MessagePart& part, const LayerKvView& kv);
void pack_part(const TransferPlan& plan, const MessagePart& part, const LayerKvView& kv,
               const TensorView& out);
// Receiver: the part's bytes inside `pool` at the request's `pages` (this decode rank's pages in
// its local token order) when they are one contiguous run (receive into them directly), else a
// view without data (receive into a buffer, then unpack_part).
TensorView dest_bytes(const TransferPlan& plan, const MessagePart& part, KvPool& pool,
                      std::span<const int32_t> pages);
void unpack_part(const TransferPlan& plan, const MessagePart& part, const TensorView& in,
                 KvPool& pool, std::span<const int32_t> pages);

// Whole-message forms: the header and every part back to back in one buffer (uint8
// [message_bytes], any device). unpack_message returns false (writing nothing) for a filler.
void pack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  const LayerKvView& kv, const TensorView& out);
void pack_filler(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                 const TensorView& out);
bool unpack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                    const TensorView& in, KvPool& pool, std::span<const int32_t> pages);

// Colocated prefill and decode on one rank with the same layout: this rank's prefill KV of
// `layer` (all `tokens` rows, the units the pool stores) written into its own pages, through
// the same part path as a transfer.
void write_local_kv(const KvGeometry& g, int64_t layer, int64_t tokens, const LayerKvView& kv,
                    KvPool& pool, std::span<const int32_t> pages);

}  // namespace distattn::serving
