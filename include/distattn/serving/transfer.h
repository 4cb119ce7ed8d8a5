#pragma once
// Wire format of the KV transfer and the two ends of resharding in transit: a prefill rank
// packs the segments of one (layer, src, dst) message of a request's TransferPlan from its
// own KV layout; the decode rank checks the header and writes the payload into the pages it
// reserved for the request, in its own layout (serving/sharding.h, serving/kv_pool.h).
//
// A message: a 32-byte MessageHeader, then each segment's payload in plan order:
//   GQA: K [tokens, units, D] then V [tokens, units, Dv]   (dtype of the geometry)
//   MLA: rows [tokens, units + rope]: the latent columns, then k_pe
// The header names request, layer, src and dst: a message that arrives where another was
// expected (a channel out of order) is an error, never silently wrong KV.
#include <cstdint>
#include <span>

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
// A filler: same size and header fields, sent for the layers a request that failed after its
// grant never produced, so the channel stays in order; the receiver discards it.
constexpr uint32_t kFillerMagic = 0xF111E4D0u;

// Bytes of the message made of plan.segments[segs] (header included).
int64_t message_bytes(const TransferPlan& plan, std::span<const size_t> segs);

// Fills `out` (uint8 [message_bytes], any device) with the message. k, v: this prefill rank's
// KV of the segments' layer as the model's KvSink gives it (GQA: k [rows, units, D],
// v [rows, units, Dv] in the geometry's dtype; MLA: k = rows [tokens, latent + rope], any
// float dtype, already rotated for a TPLA decode side; v unused). Every segment of `segs`
// must have this rank as src and one layer and dst.
void pack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  const TensorView& k, const TensorView& v, const TensorView& out);

// The filler form of the message (header with kFillerMagic, zero payload).
void pack_filler(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                 const TensorView& out);

// Checks the header against (request, layer, src, dst) of `segs` (Error kInternal naming
// both on a mismatch) and writes the payload into `pool` at the request's `pages` (this decode
// rank's pages in its local token order, serving/sharding.h decode_holdings). Returns false
// (writing nothing) for a filler.
bool unpack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                    const TensorView& in, KvPool& pool, std::span<const int32_t> pages);

// Colocated prefill and decode on one rank with the same layout: this rank's prefill KV of
// `layer` (as the model's KvSink gives it, all `tokens` rows, the units the pool stores)
// written into its own pages, through the same pack/unpack path as a transfer.
void write_local_kv(const KvGeometry& g, int64_t layer, int64_t tokens, const TensorView& k,
                    const TensorView& v, KvPool& pool, std::span<const int32_t> pages);

}  // namespace distattn::serving
