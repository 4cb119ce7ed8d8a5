// The disaggregated serving handshake: fields, wire form, comparison
// (distattn/serving/handshake.h).
#include "distattn/serving/handshake.h"

#include <cstring>
#include <sstream>

#include "distattn/core/error.h"
#include "distattn/parallel/mla.h"

namespace distattn::serving {

namespace {

constexpr uint32_t kMagic = 0x44415348u;  // "DASH"

// The wire struct: fixed size, no pointers, explicit widths.
struct Wire {
  uint32_t magic;
  uint32_t size;
  uint32_t protocol;
  int32_t role;
  int32_t family;
  int32_t dtype;
  int64_t layers, heads, kv_heads, head_dim, head_dim_v, latent, rope, page_size;
  int64_t hidden, vocab;
  uint64_t weights_seed;
  int32_t prefill_sharding, prefill_ranks, prefill_ulysses;
  int32_t decode_sharding, decode_ranks, decode_groups;
  int32_t rotation, norm;
  uint64_t rotation_id;
  int32_t mu_count;
  int32_t pad;
  float mu[kHandshakeMaxLayers * 8];
};

std::string str(int64_t v) {
  return std::to_string(v);
}

std::string hex(uint64_t v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

}  // namespace

size_t handshake_wire_bytes() {
  return sizeof(Wire);
}

std::vector<std::pair<std::string, std::string>> Handshake::fields() const {
  const KvGeometry& g = geometry;
  std::vector<std::pair<std::string, std::string>> f = {
      {"protocol_version", str(protocol)},
      {"model", family_name(g.family)},
      {"hidden", str(hidden)},
      {"vocab", str(vocab)},
      {"layers", str(g.layers)},
      {"heads", str(g.heads)},
      {"dtype", dtype_name(g.dtype)},
      {"page_size", str(g.page_size)},
      {"weights_seed", str(static_cast<int64_t>(weights_seed))},
      {"prefill_sharding", prefill_sharding_name(prefill.sharding)},
      {"prefill_ranks", str(prefill.ranks)},
      {"decode_sharding", decode_sharding_name(decode.sharding)},
      {"decode_ranks", str(decode.ranks)},
  };
  if (prefill.sharding == PrefillSharding::kHybrid)
    f.push_back({"prefill_ulysses", str(prefill.ulysses)});
  if (g.family == ModelFamily::kGqa) {
    f.push_back({"kv_heads", str(g.kv_heads)});
    f.push_back({"head_dim", str(g.head_dim)});
    f.push_back({"head_dim_v", str(g.head_dim_v)});
  } else {
    f.push_back({"latent", str(g.latent)});
    f.push_back({"rope", str(g.rope)});
  }
  if (decode.sharding == DecodeSharding::kTpla) {
    f.push_back({"tpla_groups", str(decode.groups())});
    f.push_back(
        {"tpla_rotation", parallel::rotation_name(static_cast<parallel::TplaRotation>(rotation))});
    f.push_back({"tpla_norm", parallel::norm_name(static_cast<parallel::TplaNorm>(norm))});
    f.push_back({"tpla_rotation_id", hex(rotation_id)});
    std::ostringstream os;
    os.precision(9);
    for (size_t i = 0; i < mu.size(); ++i) os << (i ? "," : "") << mu[i];
    f.push_back({"tpla_mu", os.str()});
  }
  return f;
}

std::vector<uint8_t> Handshake::serialize() const {
  DISTATTN_CHECK(mu.size() <= static_cast<size_t>(kHandshakeMaxLayers * 8), "handshake: at most ",
                 kHandshakeMaxLayers * 8, " TPLA mu values; got ", mu.size());
  Wire w{};
  w.magic = kMagic;
  w.size = sizeof(Wire);
  w.protocol = protocol;
  w.role = role;
  w.family = static_cast<int32_t>(geometry.family);
  w.dtype = static_cast<int32_t>(geometry.dtype);
  w.layers = geometry.layers;
  w.heads = geometry.heads;
  w.kv_heads = geometry.kv_heads;
  w.head_dim = geometry.head_dim;
  w.head_dim_v = geometry.head_dim_v;
  w.latent = geometry.latent;
  w.rope = geometry.rope;
  w.page_size = geometry.page_size;
  w.hidden = hidden;
  w.vocab = vocab;
  w.weights_seed = weights_seed;
  w.prefill_sharding = static_cast<int32_t>(prefill.sharding);
  w.prefill_ranks = prefill.ranks;
  w.prefill_ulysses = prefill.ulysses;
  w.decode_sharding = static_cast<int32_t>(decode.sharding);
  w.decode_ranks = decode.ranks;
  w.decode_groups = decode.tpla_groups;
  w.rotation = rotation;
  w.norm = norm;
  w.rotation_id = rotation_id;
  w.mu_count = static_cast<int32_t>(mu.size());
  for (size_t i = 0; i < mu.size(); ++i) w.mu[i] = mu[i];
  std::vector<uint8_t> out(sizeof(Wire));
  std::memcpy(out.data(), &w, sizeof(Wire));
  return out;
}

Handshake Handshake::parse(std::span<const uint8_t> bytes) {
  DISTATTN_CHECK(bytes.size() == sizeof(Wire), "handshake: expected ", sizeof(Wire), " bytes, got ",
                 bytes.size(), " (a peer of another distattn version?)");
  Wire w;
  std::memcpy(&w, bytes.data(), sizeof(Wire));
  DISTATTN_CHECK(w.magic == kMagic && w.size == sizeof(Wire),
                 "handshake: not a distattn handshake (magic ", hex(w.magic), ", size ", w.size,
                 ")");
  DISTATTN_CHECK(w.family >= 0 && w.family <= 1 && w.dtype >= 0 && w.dtype <= 6 &&
                     w.prefill_sharding >= 0 && w.prefill_sharding <= 3 && w.decode_sharding >= 0 &&
                     w.decode_sharding <= 3 && w.rotation >= 0 && w.rotation <= 2 && w.norm >= 0 &&
                     w.norm <= 1 && w.role >= 0 && w.role <= 1,
                 "handshake: an enum field is out of range");
  DISTATTN_CHECK(w.mu_count >= 0 && w.mu_count <= kHandshakeMaxLayers * 8, "handshake: mu count ",
                 w.mu_count, " out of range");
  Handshake h;
  h.protocol = w.protocol;
  h.role = w.role;
  h.geometry.family = static_cast<ModelFamily>(w.family);
  h.geometry.dtype = static_cast<DType>(w.dtype);
  h.geometry.layers = w.layers;
  h.geometry.heads = w.heads;
  h.geometry.kv_heads = w.kv_heads;
  h.geometry.head_dim = w.head_dim;
  h.geometry.head_dim_v = w.head_dim_v;
  h.geometry.latent = w.latent;
  h.geometry.rope = w.rope;
  h.geometry.page_size = w.page_size;
  h.hidden = w.hidden;
  h.vocab = w.vocab;
  h.weights_seed = w.weights_seed;
  h.prefill.sharding = static_cast<PrefillSharding>(w.prefill_sharding);
  h.prefill.ranks = w.prefill_ranks;
  h.prefill.ulysses = w.prefill_ulysses;
  h.decode.sharding = static_cast<DecodeSharding>(w.decode_sharding);
  h.decode.ranks = w.decode_ranks;
  h.decode.tpla_groups = w.decode_groups;
  h.rotation = w.rotation;
  h.norm = w.norm;
  h.rotation_id = w.rotation_id;
  h.mu.assign(w.mu, w.mu + w.mu_count);
  return h;
}

std::vector<HandshakeMismatch> compare_handshakes(const Handshake& prefill,
                                                  const Handshake& decode) {
  const auto a = prefill.fields(), b = decode.fields();
  std::vector<HandshakeMismatch> out;
  for (const auto& [name, va] : a) {
    std::string vb = "(absent)";
    for (const auto& [nb, v] : b)
      if (nb == name) vb = v;
    if (va != vb) out.push_back({name, va, vb});
  }
  for (const auto& [name, vb] : b) {
    bool found = false;
    for (const auto& [na, v] : a) found = found || na == name;
    if (!found) out.push_back({name, "(absent)", vb});
  }
  return out;
}

std::string describe_mismatches(const std::vector<HandshakeMismatch>& m) {
  if (m.empty()) return "handshake: compatible";
  std::ostringstream os;
  os << "handshake mismatch: " << m[0].field << " is " << m[0].prefill_value
     << " on the prefill side but " << m[0].decode_value << " on the decode side";
  if (m.size() > 1) {
    os << " (and " << m.size() - 1 << " more field" << (m.size() > 2 ? "s" : "") << ":";
    for (size_t i = 1; i < m.size(); ++i) os << (i > 1 ? "," : "") << ' ' << m[i].field;
    os << ')';
  }
  os << "; no KV was sent. Start both groups with the same model, dtype, page size and "
        "sharding flags";
  return os.str();
}

}  // namespace distattn::serving
