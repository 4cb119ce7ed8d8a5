#pragma once
// The compatibility handshake of disaggregated serving: before any KV byte moves, the prefill
// leader and the decode leader exchange what each side believes about the model, the KV
// layout and both shard maps, and compare them field by field (as vLLM's NIXL connector
// compares versions, dims, backend and KV dtype). A layout mismatch must be an error that
// names the field and both values, never wrong outputs (TensorRT-LLM issue 6507) or a hang
// (vLLM's PyNccl connector with differing TP).
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "distattn/serving/sharding.h"

namespace distattn::serving {

constexpr uint32_t kProtocolVersion = 1;
constexpr int kHandshakeMaxLayers = 128;  // TPLA mu values carried per layer

struct Handshake {
  uint32_t protocol = kProtocolVersion;
  int32_t role = 0;  // 0 prefill, 1 decode (not compared)
  KvGeometry geometry;
  int64_t hidden = 0;
  int64_t vocab = 0;
  uint64_t weights_seed = 0;
  PrefillLayout prefill;
  DecodeLayout decode;
  // TPLA (decode sharding tpla; zero otherwise): rotation kind, norm, a hash of U (fp32) over
  // every layer, and each layer's mu.
  int32_t rotation = 0;
  int32_t norm = 0;
  uint64_t rotation_id = 0;
  std::vector<float> mu;  // [groups * layers], at most kHandshakeMaxLayers layers

  // (name, value) of every compared field, in a fixed order.
  std::vector<std::pair<std::string, std::string>> fields() const;
  // Fixed-size little-endian wire form (magic, size and version first).
  std::vector<uint8_t> serialize() const;
  // Parses a wire form; throws Error(kInvalidArgument) on a short, oversized or foreign buffer
  // (magic, size, enum ranges, mu count), never reads past `bytes`.
  static Handshake parse(std::span<const uint8_t> bytes);
};

struct HandshakeMismatch {
  std::string field;
  std::string prefill_value;
  std::string decode_value;
};
// Every field whose values differ (empty when compatible).
std::vector<HandshakeMismatch> compare_handshakes(const Handshake& prefill,
                                                  const Handshake& decode);
// "handshake mismatch: page_size is 16 on the prefill side but 32 on the decode side (and 1
// more field: dtype)" — what the error says.
std::string describe_mismatches(const std::vector<HandshakeMismatch>& m);

// Bytes of the wire form.
size_t handshake_wire_bytes();

}  // namespace distattn::serving
