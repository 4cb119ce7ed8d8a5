// Shared parts of the serving engines: faults, option checks, the handshake contents, the
// control channel, the KV sender and receiver, the decode engine, the record exchange and the
// teacher-forced check (src/serving/engine_internal.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <thread>

#include "distattn/core/error.h"
#include "distattn/ops/elementwise.h"
#include "src/serving/engine_internal.h"

namespace distattn::serving {

// ---- faults and options ---------------------------------------------------------------------

namespace {

std::vector<std::string> split_colon(const std::string& s) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : s) {
    if (c == ':') {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  return parts;
}

int64_t to_int(const std::string& s, const std::string& whole) {
  size_t used = 0;
  int64_t v = -1;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  DISTATTN_CHECK(used == s.size() && !s.empty() && v >= 0, "--fault '", whole, "': '", s,
                 "' is not a non-negative integer");
  return v;
}

}  // namespace

Fault parse_fault(const std::string& text) {
  const std::vector<std::string> p = split_colon(text);
  const std::string forms =
      "; use refuse:REQ[:RANK], drop-completion:REQ, prefill-throw:REQ[:RANK[:LAYER]], "
      "handshake:FIELD, exit:WORLD_RANK:REQ or hang:WORLD_RANK:REQ";
  Fault f;
  const std::string& k = p[0];
  if (k == "refuse" && (p.size() == 2 || p.size() == 3)) {
    f.kind = Fault::Kind::kRefuse;
    f.request = to_int(p[1], text);
    f.rank = p.size() == 3 ? static_cast<int>(to_int(p[2], text)) : -1;
  } else if (k == "drop-completion" && p.size() == 2) {
    f.kind = Fault::Kind::kDropCompletion;
    f.request = to_int(p[1], text);
  } else if (k == "prefill-throw" && p.size() >= 2 && p.size() <= 4) {
    f.kind = Fault::Kind::kPrefillThrow;
    f.request = to_int(p[1], text);
    f.rank = p.size() >= 3 ? static_cast<int>(to_int(p[2], text)) : 0;
    f.layer = p.size() == 4 ? to_int(p[3], text) : 0;
  } else if (k == "handshake" && p.size() == 2 && !p[1].empty()) {
    f.kind = Fault::Kind::kHandshake;
    f.field = p[1];
  } else if ((k == "exit" || k == "hang") && p.size() == 3) {
    f.kind = k == "exit" ? Fault::Kind::kExit : Fault::Kind::kHang;
    f.rank = static_cast<int>(to_int(p[1], text));
    f.request = to_int(p[2], text);
  } else {
    DISTATTN_THROW(Status::kInvalidArgument, "--fault '", text, "' is not a fault", forms);
  }
  return f;
}

void validate(const EngineOptions& o, int world_size) {
  o.model.validate();
  const int p = o.prefill.ranks, d = o.decode.layout.ranks;
  DISTATTN_CHECK(p >= 1 && d >= 1 && p + d == world_size, "--prefill-ranks (", p,
                 ") + --decode-ranks (", d, ") must equal the world size (", world_size,
                 "): start the job with mpirun -np ", p + d, " or change the split");
  DISTATTN_CHECK(o.kv_pages >= 1, "--kv-pages must be >= 1; got ", o.kv_pages);
  DISTATTN_CHECK_STATUS(o.device.is_cpu() || o.model.family == ModelFamily::kGqa,
                        Status::kUnsupported,
                        "--model mla runs on CPU ranks (its prefill is host-only): use --device "
                        "cpu");
  DISTATTN_CHECK(o.max_batch >= 1, "--max-batch must be >= 1; got ", o.max_batch);
  DISTATTN_CHECK(o.transfer_window >= 1, "--transfer-window must be >= 1; got ", o.transfer_window);
  DISTATTN_CHECK(o.decode.page_size >= 1, "--page-size must be >= 1; got ", o.decode.page_size);
  DISTATTN_CHECK(o.admission_timeout_s > 0 && o.kv_timeout_s > 0,
                 "--admission-timeout-ms and --kv-timeout-ms must be > 0");
  DISTATTN_CHECK(o.model.layers <= kHandshakeMaxLayers, "--layers must be <= ", kHandshakeMaxLayers,
                 "; got ", o.model.layers);
  validate_layouts(o.model.geometry(o.decode.page_size), o.prefill, o.decode.layout);
  for (const Fault& f : o.faults) {
    if (f.kind == Fault::Kind::kRefuse)
      DISTATTN_CHECK(f.rank < d, "--fault refuse: decode rank ", f.rank, " of ", d);
    if (f.kind == Fault::Kind::kPrefillThrow)
      DISTATTN_CHECK(f.rank < p && f.layer < o.model.layers, "--fault prefill-throw: prefill rank ",
                     f.rank, " of ", p, ", layer ", f.layer, " of ", o.model.layers);
    if (f.kind == Fault::Kind::kExit || f.kind == Fault::Kind::kHang)
      DISTATTN_CHECK(f.rank < world_size, "--fault ",
                     f.kind == Fault::Kind::kExit ? "exit" : "hang", ": world rank ", f.rank,
                     " of ", world_size);
  }
}

Handshake make_handshake(const EngineOptions& opts, int role,
                         const std::vector<parallel::TplaReparam>& reparams) {
  Handshake h;
  h.role = role;
  h.geometry = opts.model.geometry(opts.decode.page_size);
  h.hidden = opts.model.hidden;
  h.vocab = opts.model.vocab;
  h.weights_seed = opts.model.seed;
  h.prefill = opts.prefill;
  h.decode = opts.decode.layout;
  if (opts.decode.layout.sharding == DecodeSharding::kTpla) {
    h.rotation = static_cast<int32_t>(opts.decode.rotation);
    h.norm = static_cast<int32_t>(opts.decode.norm);
    h.rotation_id = reparam_hash(reparams);
    for (const parallel::TplaReparam& rp : reparams)
      h.mu.insert(h.mu.end(), rp.mu.begin(), rp.mu.end());
  }
  // The decode side of a handshake fault declares another value of one field.
  if (role == 1)
    for (const Fault& f : opts.faults) {
      if (f.kind != Fault::Kind::kHandshake) continue;
      if (f.field == "page_size")
        h.geometry.page_size *= 2;
      else if (f.field == "dtype")
        h.geometry.dtype = h.geometry.dtype == DType::kFloat32 ? DType::kBFloat16 : DType::kFloat32;
      else if (f.field == "layers")
        h.geometry.layers += 1;
      else if (f.field == "hidden")
        h.hidden += 2;
      else if (f.field == "decode_ranks")
        h.decode.ranks += 1;
      else if (f.field == "prefill_ranks")
        h.prefill.ranks += 1;
      else if (f.field == "protocol_version")
        h.protocol += 1;
      else if (f.field == "kv_heads")
        h.geometry.kv_heads += 1;
      else if (f.field == "tpla_rotation_id")
        h.rotation_id ^= 1;
      else
        DISTATTN_THROW(Status::kInvalidArgument, "--fault handshake:", f.field,
                       ": use page_size, dtype, layers, hidden, decode_ranks, prefill_ranks, "
                       "protocol_version, kv_heads or tpla_rotation_id");
    }
  return h;
}

namespace detail {

bool has_fault(const EngineOptions& o, Fault::Kind k, int64_t request, int rank) {
  for (const Fault& f : o.faults)
    if (f.kind == k && f.request == request && (f.rank < 0 || f.rank == rank)) return true;
  return false;
}

void maybe_die(const EngineOptions& o, int world_rank, int64_t request) {
  for (const Fault& f : o.faults) {
    if (f.request != request || f.rank != world_rank) continue;
    if (f.kind == Fault::Kind::kExit) {
      std::fprintf(stderr, "[distattn-serve] fault: world rank %d exits at request %lld\n",
                   world_rank, static_cast<long long>(request));
      std::fflush(stderr);
      std::_Exit(3);
    }
    if (f.kind == Fault::Kind::kHang) {
      std::fprintf(stderr, "[distattn-serve] fault: world rank %d hangs at request %lld\n",
                   world_rank, static_cast<long long>(request));
      std::fflush(stderr);
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
  }
}

bool verbose(const EngineOptions& o) {
  static const bool env = [] {
    const char* v = std::getenv("DISTATTN_VERBOSE");
    return v != nullptr && std::string(v) != "0";
  }();
  return o.verbose || env;
}

void log_transition(const EngineOptions& o, const char* side, int64_t request, const char* what,
                    const std::string& detail) {
  if (!verbose(o)) return;
  std::fprintf(stderr, "[distattn-serve %s] request %lld %s%s%s\n", side,
               static_cast<long long>(request), what, detail.empty() ? "" : ": ", detail.c_str());
}

// ---- control channel ------------------------------------------------------------------------

CtrlMsg make_ctrl(CtrlType type, int64_t request, int64_t a, int64_t b, double t,
                  const std::string& text) {
  CtrlMsg m;
  m.type = static_cast<int32_t>(type);
  m.request = request;
  m.a = a;
  m.b = b;
  m.t = t;
  std::strncpy(m.text, text.c_str(), sizeof(m.text) - 1);
  return m;
}

CtrlChannel::CtrlChannel(comm::Communicator& comm, int peer, const char* peer_name)
    : comm_(comm), peer_(peer), peer_name_(peer_name) {
  in_ = std::make_unique<CtrlMsg>();
  last_sent_ = last_received_ = std::chrono::steady_clock::now();
  post();
}

CtrlChannel::~CtrlChannel() = default;

void CtrlChannel::post() {
  const comm::P2POp op = comm::P2POp::recv(in_.get(), sizeof(CtrlMsg), DType::kUInt8, peer_);
  recv_ = comm_.igroup(std::span<const comm::P2POp>(&op, 1));
  receiving_ = true;
}

void CtrlChannel::send(const CtrlMsg& m, bool last) {
  DISTATTN_CHECK_STATUS(!closed_, Status::kInternal,
                        "serving control channel: a message after this side's last one");
  Out o;
  o.msg = std::make_unique<CtrlMsg>(m);
  const comm::P2POp op = comm::P2POp::send(o.msg.get(), sizeof(CtrlMsg), DType::kUInt8, peer_);
  o.handle = comm_.igroup(std::span<const comm::P2POp>(&op, 1));
  out_.push_back(std::move(o));
  while (!out_.empty() && out_.front().handle.test()) out_.pop_front();
  last_sent_ = std::chrono::steady_clock::now();
  closed_ = last;
}

void CtrlChannel::heartbeat() {
  if (closed_) return;
  const auto interval = std::min<std::chrono::steady_clock::duration>(
      std::chrono::milliseconds(500), comm_.timeout() / 4);
  if (std::chrono::steady_clock::now() - last_sent_ >= interval)
    send(make_ctrl(CtrlType::kHeartbeat, -1));
}

std::optional<CtrlMsg> CtrlChannel::poll(CtrlType last) {
  while (!out_.empty() && out_.front().handle.test()) out_.pop_front();
  heartbeat();
  for (;;) {
    if (!receiving_) return std::nullopt;
    const auto now = std::chrono::steady_clock::now();
    if (!recv_.test()) {
      DISTATTN_CHECK_STATUS(now - last_received_ < comm_.timeout(), Status::kTimeout,
                            "serving: the ", peer_name_,
                            " sent nothing (not even a heartbeat) for ",
                            std::chrono::duration<double>(now - last_received_).count(),
                            " s (DISTATTN_COMM_TIMEOUT_S): it died or hangs; ending the job");
      return std::nullopt;
    }
    last_received_ = now;
    CtrlMsg m = *in_;
    DISTATTN_CHECK_STATUS(m.magic == CtrlMsg{}.magic, Status::kInternal,
                          "serving control channel: a message without the control magic arrived");
    if (m.type == static_cast<int32_t>(last))
      receiving_ = false;
    else
      post();
    if (m.type != static_cast<int32_t>(CtrlType::kHeartbeat)) return m;
  }
}

void CtrlChannel::flush() {
  for (Out& o : out_) o.handle.wait();
  out_.clear();
}

// ---- staging buffers, KV sender / receiver ------------------------------------------------

namespace {
int size_class(int64_t bytes) {
  int c = 12;  // 4 KiB at least
  while ((int64_t{1} << c) < bytes) ++c;
  return c;
}
}  // namespace

Tensor BufferCache::get(int64_t bytes) {
  const int c = size_class(bytes);
  if (static_cast<size_t>(c) < by_class_.size() && !by_class_[static_cast<size_t>(c)].empty()) {
    Tensor t = std::move(by_class_[static_cast<size_t>(c)].back());
    by_class_[static_cast<size_t>(c)].pop_back();
    cached_ -= int64_t{1} << c;
    return t;
  }
  return Tensor::empty({int64_t{1} << c}, DType::kUInt8, device_);
}

void BufferCache::put(Tensor t) {
  if (!t.defined()) return;
  const int64_t cap = t.numel();
  if (cached_ + cap > max_bytes_) return;  // released
  const int c = size_class(cap);
  if (by_class_.size() <= static_cast<size_t>(c)) by_class_.resize(static_cast<size_t>(c) + 1);
  by_class_[static_cast<size_t>(c)].push_back(std::move(t));
  cached_ += cap;
}

TensorView BufferCache::bytes(const Tensor& t, int64_t n) {
  return TensorView(t.data(), DType::kUInt8, t.device(), {n});
}

KvSender::KvSender(comm::Communicator& kv, int decode_world_offset, Device device)
    : kv_(kv), offset_(decode_world_offset), device_(device), stream_(device), cache_(device) {}

void KvSender::post(int dst, Out o, const std::vector<comm::P2POp>& ops) {
  (void)dst;
  // The sends read what the compute (default stream) wrote and the packing copies enqueued.
  stream_wait_stream(device_, stream_.get(), nullptr);
  o.handle = kv_.igroup(ops, stream_.get());
  out_.push_back(std::move(o));
}

void KvSender::send_layer(const TransferPlan& plan, int src, int64_t layer, int64_t request,
                          const LayerKv& kv) {
  for (int dst = 0; dst < plan.decode.ranks; ++dst) {
    const std::vector<size_t> segs = plan.message(layer, src, dst);
    if (segs.empty()) continue;
    Out o;
    std::vector<comm::P2POp> ops;
    for (const MessagePart& p : message_parts(plan, segs)) {
      TensorView bytes;
      if (p.kind == MessagePart::Kind::kHeader) {
        o.buffers.push_back(cache_.get(p.bytes));
        bytes = BufferCache::bytes(o.buffers.back(), p.bytes);
        write_header(plan, segs, request, kMessageMagic, bytes);
      } else {
        bytes = source_bytes(plan, p, kv.view);
        if (bytes.data == nullptr) {
          o.buffers.push_back(cache_.get(p.bytes));
          bytes = BufferCache::bytes(o.buffers.back(), p.bytes);
          pack_part(plan, p, kv.view, bytes);
        } else {
          o.keep_k = kv.owner_k;
          o.keep_v = kv.owner_v;
        }
      }
      ops.push_back(comm::P2POp::send(bytes.data, static_cast<size_t>(p.bytes), DType::kUInt8,
                                      offset_ + dst));
    }
    post(dst, std::move(o), ops);
  }
  poll();
}

void KvSender::send_fillers(const TransferPlan& plan, int src, int64_t layer, int64_t request) {
  for (int dst = 0; dst < plan.decode.ranks; ++dst) {
    const std::vector<size_t> segs = plan.message(layer, src, dst);
    if (segs.empty()) continue;
    Out o;
    std::vector<comm::P2POp> ops;
    for (const MessagePart& p : message_parts(plan, segs)) {
      o.buffers.push_back(cache_.get(p.bytes));
      const TensorView bytes = BufferCache::bytes(o.buffers.back(), p.bytes);
      if (p.kind == MessagePart::Kind::kHeader)
        write_header(plan, segs, request, kFillerMagic, bytes);
      else
        ops::tensor_zero(bytes);
      ops.push_back(comm::P2POp::send(bytes.data, static_cast<size_t>(p.bytes), DType::kUInt8,
                                      offset_ + dst));
    }
    post(dst, std::move(o), ops);
  }
}

void KvSender::poll() {
  for (auto it = out_.begin(); it != out_.end();) {
    if (!it->handle.test()) {
      ++it;
      continue;
    }
    for (Tensor& b : it->buffers) cache_.put(std::move(b));
    it = out_.erase(it);
  }
}

void KvSender::wait_all() {
  for (Out& o : out_) {
    o.handle.wait();
    for (Tensor& b : o.buffers) cache_.put(std::move(b));
  }
  out_.clear();
}

KvReceiver::KvReceiver(comm::Communicator& kv, std::shared_ptr<const TransferPlan> plan, int dst,
                       int64_t request, KvPool& pool, std::span<const int32_t> pages,
                       BufferCache& cache, Stream stream)
    : plan_(std::move(plan)),
      request_(request),
      cache_(cache),
      stream_(stream),
      device_(pool.k(0).device) {
  // The receives write pages the default stream may still be reading (a freed request's).
  stream_wait_stream(device_, stream_, nullptr);
  const TransferPlan& p = *plan_;
  // Posted in (layer, src) order: the order in which each prefill rank sends.
  for (int64_t l = 0; l < p.geometry.layers; ++l)
    for (int src = 0; src < p.prefill.ranks; ++src) {
      In in;
      in.segs = p.message(l, src, dst);
      if (in.segs.empty()) continue;
      in.parts = message_parts(p, in.segs);
      std::vector<comm::P2POp> ops;
      for (const MessagePart& part : in.parts) {
        TensorView bytes;
        if (part.kind != MessagePart::Kind::kHeader) bytes = dest_bytes(p, part, pool, pages);
        if (bytes.data == nullptr) {
          in.staging.push_back(cache_.get(part.bytes));
          bytes = BufferCache::bytes(in.staging.back(), part.bytes);
        } else {
          in.staging.emplace_back();  // lands in the pages
        }
        ops.push_back(
            comm::P2POp::recv(bytes.data, static_cast<size_t>(part.bytes), DType::kUInt8, src));
      }
      in.handle = kv.igroup(ops, stream_);
      in_.push_back(std::move(in));
    }
  pending_ = in_.size();
}

bool KvReceiver::poll(KvPool& pool, std::span<const int32_t> pages) {
  for (In& in : in_) {
    if (in.done || !in.handle.test()) continue;
    // The model's stream (and the unpacking below) after the received data.
    stream_wait_stream(device_, nullptr, stream_);
    // Part 0 is the header (always staged).
    const bool data = check_header(*plan_, in.segs, request_,
                                   BufferCache::bytes(in.staging[0], in.parts[0].bytes));
    if (!data) filler_ = true;
    for (size_t i = 0; i < in.parts.size(); ++i) {
      if (i > 0 && data && in.staging[i].defined())
        unpack_part(*plan_, in.parts[i], BufferCache::bytes(in.staging[i], in.parts[i].bytes), pool,
                    pages);
      cache_.put(std::move(in.staging[i]));
    }
    in.staging.clear();
    in.done = true;
    --pending_;
  }
  return pending_ == 0;
}

// ---- decode engine --------------------------------------------------------------------------

DecodeEngine::DecodeEngine(const EngineOptions& opts, std::shared_ptr<comm::Communicator> group,
                           std::vector<parallel::TplaReparam> reparams)
    : opts_(opts), group_(std::move(group)), layout_(opts.decode.layout), staging(opts.device) {
  rank_ = group_->rank();
  geometry_ = opts.model.geometry(opts.decode.page_size);
  DecodeSetup setup = opts.decode;
  setup.layout = layout_;
  model_ =
      std::make_unique<DecodeModel>(opts.model, setup, group_, std::move(reparams), opts.device);
  pool_ = std::make_unique<KvPool>(geometry_, model_->pool_units(), opts.kv_pages, opts.device);
  transfer_stream_ = OwnedStream(opts.device);
}

int64_t DecodeEngine::pages_needed(const DecodeRequest& r) const {
  return decode_pages_needed(geometry_, layout_, rank_, r.input_len + r.output_len);
}

DecodeOutput DecodeEngine::step(const std::vector<DecodeRequest*>& running,
                                const std::function<void()>& progress) {
  DecodeBatch b;
  const int64_t n = static_cast<int64_t>(running.size());
  const int64_t ps = geometry_.page_size;
  int64_t max_pages = 1;
  for (const DecodeRequest* r : running)
    max_pages = std::max<int64_t>(max_pages, static_cast<int64_t>(r->pages.size()));
  b.page_table = Tensor::zeros({n, max_pages}, DType::kInt32);
  b.seq_lens = Tensor::empty({n}, DType::kInt32);
  const bool cp = layout_.sharding == DecodeSharding::kDecodeCp;
  for (int64_t i = 0; i < n; ++i) {
    const DecodeRequest& r = *running[static_cast<size_t>(i)];
    b.tokens.push_back(r.last_token);
    const int64_t pos = r.length;
    b.positions.push_back(pos);
    int64_t row = -1;
    if (!cp || (pos / ps) % layout_.ranks == rank_) {
      const int64_t li = cp ? (pos / ps / layout_.ranks) * ps + pos % ps : pos;
      DISTATTN_CHECK_STATUS(li / ps < static_cast<int64_t>(r.pages.size()), Status::kInternal,
                            "decode: request ", r.id, " has no page for its token at position ",
                            pos);
      row = static_cast<int64_t>(r.pages[static_cast<size_t>(li / ps)]) * ps + li % ps;
    }
    b.append_rows.push_back(row);
    for (size_t j = 0; j < r.pages.size(); ++j)
      b.page_table.data_as<int32_t>()[i * max_pages + static_cast<int64_t>(j)] = r.pages[j];
    b.seq_lens.data_as<int32_t>()[i] =
        static_cast<int32_t>(decode_local_tokens(geometry_, layout_, rank_, pos + 1));
  }
  return model_->step(b, *pool_, progress);
}

// ---- records ----------------------------------------------------------------------------------

namespace {

struct Writer {
  std::vector<uint8_t> out;
  template <typename T>
  void put(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  template <typename T>
  void put_vec(const std::vector<T>& v) {
    put<int64_t>(static_cast<int64_t>(v.size()));
    if (v.empty()) return;  // data() may be null
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    out.insert(out.end(), p, p + v.size() * sizeof(T));
  }
};

struct Reader {
  std::span<const uint8_t> in;
  size_t off = 0;
  template <typename T>
  T get() {
    DISTATTN_CHECK_STATUS(off + sizeof(T) <= in.size(), Status::kInternal,
                          "serving: truncated record message");
    T v;
    std::memcpy(&v, in.data() + off, sizeof(T));
    off += sizeof(T);
    return v;
  }
  template <typename T>
  std::vector<T> get_vec() {
    const int64_t n = get<int64_t>();
    DISTATTN_CHECK_STATUS(n >= 0 && off + static_cast<size_t>(n) * sizeof(T) <= in.size(),
                          Status::kInternal, "serving: truncated record message");
    std::vector<T> v(static_cast<size_t>(n));
    if (n > 0) std::memcpy(v.data(), in.data() + off, static_cast<size_t>(n) * sizeof(T));
    off += static_cast<size_t>(n) * sizeof(T);
    return v;
  }
};

}  // namespace

std::vector<uint8_t> pack_records(const std::vector<RequestRecord>& records) {
  Writer w;
  w.put<int64_t>(static_cast<int64_t>(records.size()));
  for (const RequestRecord& r : records) {
    w.put(r.id);
    w.put(r.arrival_s);
    w.put(r.input_len);
    w.put(r.output_len);
    w.put<int32_t>(r.completed ? 1 : 0);
    w.put(r.prefill_start_s);
    w.put(r.prefill_end_s);
    w.put(r.kv_ready_s);
    w.put_vec(std::vector<char>(r.reason.begin(), r.reason.end()));
    w.put_vec(r.token_times);
    w.put_vec(r.tokens);
    w.put_vec(r.hidden);
  }
  return w.out;
}

std::vector<RequestRecord> unpack_records(std::span<const uint8_t> bytes) {
  Reader rd{bytes};
  const int64_t n = rd.get<int64_t>();
  DISTATTN_CHECK_STATUS(n >= 0 && n < (int64_t{1} << 40), Status::kInternal,
                        "serving: bad record count");
  std::vector<RequestRecord> out;
  for (int64_t i = 0; i < n; ++i) {
    RequestRecord r;
    r.id = rd.get<int64_t>();
    r.arrival_s = rd.get<double>();
    r.input_len = rd.get<int64_t>();
    r.output_len = rd.get<int64_t>();
    r.completed = rd.get<int32_t>() != 0;
    r.prefill_start_s = rd.get<double>();
    r.prefill_end_s = rd.get<double>();
    r.kv_ready_s = rd.get<double>();
    const std::vector<char> reason = rd.get_vec<char>();
    r.reason.assign(reason.begin(), reason.end());
    r.token_times = rd.get_vec<double>();
    r.tokens = rd.get_vec<int32_t>();
    r.hidden = rd.get_vec<float>();
    out.push_back(std::move(r));
  }
  return out;
}

// ---- teacher-forced check ----------------------------------------------------------------------

double check_records(comm::Communicator& world, const EngineOptions& opts, const WorkloadSpec& spec,
                     std::vector<RequestRecord>& records) {
  const int w = world.size(), me = world.rank();
  const int64_t hid = opts.model.hidden;
  // Rank 0 tells everyone which requests completed and how many tokens each has.
  int64_t n = static_cast<int64_t>(records.size());
  world.broadcast(&n, &n, 1, DType::kInt64, 0);
  std::vector<int64_t> meta(static_cast<size_t>(3 * n), 0);  // id, input_len, tokens (0: skip)
  if (me == 0)
    for (int64_t i = 0; i < n; ++i) {
      const RequestRecord& r = records[static_cast<size_t>(i)];
      meta[static_cast<size_t>(3 * i)] = r.id;
      meta[static_cast<size_t>(3 * i + 1)] = r.input_len;
      const bool ok = r.completed && !r.tokens.empty() &&
                      r.hidden.size() == r.tokens.size() * static_cast<size_t>(hid);
      meta[static_cast<size_t>(3 * i + 2)] = ok ? static_cast<int64_t>(r.tokens.size()) : 0;
    }
  world.broadcast(meta.data(), meta.data(), meta.size(), DType::kInt64, 0);
  std::unique_ptr<comm::Communicator> self_owner = world.split(me, 0);
  std::shared_ptr<comm::Communicator> self(std::move(self_owner));
  PrefillModel ref(opts.model, PrefillLayout{PrefillSharding::kHeads, 1, 1}, self);
  double worst = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = meta[static_cast<size_t>(3 * i)], in = meta[static_cast<size_t>(3 * i + 1)];
    const int64_t nt = meta[static_cast<size_t>(3 * i + 2)];
    if (nt == 0) continue;
    const int checker = static_cast<int>(i % w);
    std::vector<int32_t> toks(static_cast<size_t>(nt));
    std::vector<float> hidden(static_cast<size_t>(nt * hid));
    if (me == 0) {
      toks = records[static_cast<size_t>(i)].tokens;
      hidden = records[static_cast<size_t>(i)].hidden;
    }
    if (checker != 0) {
      if (me == 0) {
        world.send(toks.data(), toks.size(), DType::kInt32, checker);
        world.send(hidden.data(), hidden.size(), DType::kFloat32, checker);
      } else if (me == checker) {
        world.recv(toks.data(), toks.size(), DType::kInt32, 0);
        world.recv(hidden.data(), hidden.size(), DType::kFloat32, 0);
      }
    }
    if (me != checker) continue;
    // Teacher forcing: the prompt, then the engine's own tokens but the last.
    std::vector<int32_t> seq = prompt_tokens(spec.seed, id, in, opts.model.vocab);
    seq.insert(seq.end(), toks.begin(), toks.end() - 1);
    const PrefillOutput out = ref.run(seq, {}, {}, /*all_hidden=*/true);
    for (int64_t s = 0; s < nt; ++s) {
      const float* ref_row = out.all_hidden.data() + (in - 1 + s) * hid;
      const float* got = hidden.data() + s * hid;
      double err = 0, mx = 0;
      for (int64_t j = 0; j < hid; ++j) {
        err = std::max(err, std::abs(static_cast<double>(got[j]) - ref_row[j]));
        mx = std::max(mx, std::abs(static_cast<double>(ref_row[j])));
      }
      const double rel = mx > 0 ? err / mx : err;
      worst = std::max(worst, std::isnan(rel) ? INFINITY : rel);
    }
  }
  world.all_reduce(&worst, &worst, 1, DType::kFloat64, comm::ReduceOp::kMax);
  return worst < 0 ? std::numeric_limits<double>::quiet_NaN() : worst;
}

}  // namespace detail

}  // namespace distattn::serving
