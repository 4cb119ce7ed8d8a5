// KV message parts: packing or direct sends on the prefill side, direct receives or unpacking
// into pages on the decode side (distattn/serving/transfer.h).
#include "distattn/serving/transfer.h"

#include <algorithm>
#include <cstring>

#include "distattn/core/error.h"
#include "distattn/ops/elementwise.h"

namespace distattn::serving {

namespace {

uint8_t* bytes_at(const TensorView& buf, int64_t offset) {
  return static_cast<uint8_t*>(buf.data) + offset;
}

TensorView byte_view(void* p, int64_t bytes, Device dev) {
  return TensorView(p, DType::kUInt8, dev, {bytes});
}

void check_message(const TransferPlan& plan, std::span<const size_t> segs, const char* op) {
  DISTATTN_CHECK(!segs.empty(), op, ": a message needs at least one segment");
  const TransferSegment& s0 = plan.segments.at(segs[0]);
  for (size_t i : segs) {
    const TransferSegment& s = plan.segments.at(i);
    DISTATTN_CHECK(s.layer == s0.layer && s.src == s0.src && s.dst == s0.dst, op,
                   ": the segments of one message must share layer, src and dst");
  }
}

void check_buffer(const TensorView& buf, int64_t bytes, const char* op) {
  DISTATTN_CHECK(buf.dtype == DType::kUInt8 && buf.is_contiguous() && buf.numel() == bytes, op,
                 ": the buffer must be packed uint8 [", bytes, "]; got ", buf.str());
}

// The part's data in the sender's tensors, as a (possibly strided) typed view.
TensorView source_view(const TransferPlan& plan, const MessagePart& part, const LayerKvView& kv) {
  const KvGeometry& g = plan.geometry;
  const TransferSegment& s = plan.segments.at(part.segment);
  const int64_t nt = s.block.tokens(), nu = s.block.units();
  if (g.family == ModelFamily::kGqa) {
    const TensorView& t = part.kind == MessagePart::Kind::kKeys ? kv.k : kv.v;
    const int64_t d = part.kind == MessagePart::Kind::kKeys ? g.head_dim : g.head_dim_v;
    DISTATTN_CHECK(t.ndim == 3 && t.dtype == g.dtype && s.src_row + nt <= t.size(0) &&
                       s.src_unit + nu <= t.size(1) && t.size(2) == d,
                   "KV transfer: the prefill KV ", t.str(), " cannot serve rows [", s.src_row, " +",
                   nt, ") units [", s.src_unit, " +", nu, ")");
    return t.slice(0, s.src_row, nt).slice(1, s.src_unit, nu);
  }
  DISTATTN_CHECK(
      kv.k.ndim == 2 && kv.k.size(1) == g.latent + g.rope && s.src_row + nt <= kv.k.size(0),
      "KV transfer: the MLA rows ", kv.k.str(), " cannot serve tokens [", s.src_row, " +", nt, ")");
  return kv.k.slice(0, s.src_row, nt);
}

// Local tokens [r0, r0 + n) sit in consecutive pages (so their rows are one run of the pool).
bool consecutive_pages(std::span<const int32_t> pages, int64_t r0, int64_t n, int64_t ps) {
  for (int64_t p = r0 / ps; p < (r0 + n - 1) / ps; ++p)
    if (pages[static_cast<size_t>(p + 1)] != pages[static_cast<size_t>(p)] + 1) return false;
  return true;
}

void check_pages(const TransferSegment& s, const KvPool& pool, std::span<const int32_t> pages) {
  const int64_t ps = pool.page_size();
  DISTATTN_CHECK(
      (s.dst_row + s.block.tokens() + ps - 1) / ps <= static_cast<int64_t>(pages.size()) &&
          s.dst_unit + s.block.units() <= pool.units(),
      "KV transfer: the request's ", pages.size(), " pages (", pool.units(),
      " units) cannot hold local tokens [", s.dst_row, " +", s.block.tokens(), ") units [",
      s.dst_unit, " +", s.block.units(), ")");
}

}  // namespace

std::vector<MessagePart> message_parts(const TransferPlan& plan, std::span<const size_t> segs) {
  const KvGeometry& g = plan.geometry;
  const int64_t elt = static_cast<int64_t>(dtype_size(g.dtype));
  std::vector<MessagePart> parts;
  parts.push_back({MessagePart::Kind::kHeader, 0, static_cast<int64_t>(sizeof(MessageHeader))});
  for (size_t i : segs) {
    const TransferSegment& s = plan.segments.at(i);
    const int64_t nt = s.block.tokens(), nu = s.block.units();
    if (g.family == ModelFamily::kGqa) {
      parts.push_back({MessagePart::Kind::kKeys, i, nt * nu * g.head_dim * elt});
      parts.push_back({MessagePart::Kind::kValues, i, nt * nu * g.head_dim_v * elt});
    } else {
      parts.push_back({MessagePart::Kind::kRows, i, nt * (nu + g.rope) * elt});
    }
  }
  return parts;
}

int64_t message_bytes(const TransferPlan& plan, std::span<const size_t> segs) {
  int64_t n = 0;
  for (const MessagePart& p : message_parts(plan, segs)) n += p.bytes;
  return n;
}

void write_header(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  uint32_t magic, const TensorView& out) {
  check_message(plan, segs, "write_header");
  check_buffer(out, static_cast<int64_t>(sizeof(MessageHeader)), "write_header");
  const TransferSegment& s0 = plan.segments[segs[0]];
  MessageHeader hdr;
  hdr.magic = magic;
  hdr.layer = static_cast<uint32_t>(s0.layer);
  hdr.request = request;
  hdr.src = s0.src;
  hdr.dst = s0.dst;
  hdr.payload_bytes = message_bytes(plan, segs) - static_cast<int64_t>(sizeof(MessageHeader));
  device_copy(out.data, out.device, &hdr, Device::cpu(), sizeof(hdr));
}

bool check_header(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  const TensorView& in) {
  check_message(plan, segs, "check_header");
  check_buffer(in, static_cast<int64_t>(sizeof(MessageHeader)), "check_header");
  const TransferSegment& s0 = plan.segments[segs[0]];
  const int64_t payload = message_bytes(plan, segs) - static_cast<int64_t>(sizeof(MessageHeader));
  MessageHeader hdr;
  device_copy(&hdr, Device::cpu(), in.data, in.device, sizeof(hdr));
  const bool filler = hdr.magic == kFillerMagic;
  DISTATTN_CHECK_STATUS(
      (hdr.magic == kMessageMagic || filler) && hdr.request == request &&
          hdr.layer == static_cast<uint32_t>(s0.layer) && hdr.src == s0.src && hdr.dst == s0.dst &&
          hdr.payload_bytes == payload,
      Status::kInternal, "KV channel out of order: expected request ", request, " layer ", s0.layer,
      " from prefill rank ", s0.src, " to decode rank ", s0.dst, " (", payload,
      " payload bytes), got ",
      hdr.magic == kMessageMagic || filler ? "" : "a message without the KV magic, or ", "request ",
      hdr.request, " layer ", hdr.layer, " from ", hdr.src, " to ", hdr.dst, " (",
      hdr.payload_bytes, " payload bytes)");
  return !filler;
}

TensorView source_bytes(const TransferPlan& plan, const MessagePart& part, const LayerKvView& kv) {
  const KvGeometry& g = plan.geometry;
  const TensorView src = source_view(plan, part, kv);
  if (src.dtype != g.dtype) return {};
  if (g.family == ModelFamily::kMla && (plan.segments[part.segment].block.units() != g.latent ||
                                        plan.segments[part.segment].block.unit_begin != 0))
    return {};  // a latent slice: not one run of the rows
  if (!src.is_contiguous()) return {};
  return byte_view(src.data, part.bytes, src.device);
}

void pack_part(const TransferPlan& plan, const MessagePart& part, const LayerKvView& kv,
               const TensorView& out) {
  check_buffer(out, part.bytes, "pack_part");
  const KvGeometry& g = plan.geometry;
  const TensorView src = source_view(plan, part, kv);
  const TransferSegment& s = plan.segments[part.segment];
  const int64_t nt = s.block.tokens(), nu = s.block.units();
  if (g.family == ModelFamily::kGqa) {
    const int64_t d = part.kind == MessagePart::Kind::kKeys ? g.head_dim : g.head_dim_v;
    ops::tensor_copy(TensorView(out.data, g.dtype, out.device, {nt, nu, d}), src);
    return;
  }
  const TensorView dst(out.data, g.dtype, out.device, {nt, nu + g.rope});
  ops::tensor_copy(dst.slice(1, 0, nu), src.slice(1, s.block.unit_begin, nu));
  if (g.rope > 0) ops::tensor_copy(dst.slice(1, nu, g.rope), src.slice(1, g.latent, g.rope));
}

TensorView dest_bytes(const TransferPlan& plan, const MessagePart& part, KvPool& pool,
                      std::span<const int32_t> pages) {
  const TransferSegment& s = plan.segments.at(part.segment);
  check_pages(s, pool, pages);
  const int64_t ps = pool.page_size();
  if (s.block.units() != pool.units() || !consecutive_pages(pages, s.dst_row, s.block.tokens(), ps))
    return {};
  const int64_t r0 = s.dst_row;
  const int64_t row = static_cast<int64_t>(pages[static_cast<size_t>(r0 / ps)]) * ps + r0 % ps;
  const TensorView& t = part.kind == MessagePart::Kind::kValues ? pool.v(s.layer) : pool.k(s.layer);
  const int64_t row_bytes = static_cast<int64_t>(t.nbytes()) / (t.size(0) * t.size(1));
  return byte_view(static_cast<uint8_t*>(t.data) + row * row_bytes, part.bytes, t.device);
}

void unpack_part(const TransferPlan& plan, const MessagePart& part, const TensorView& in,
                 KvPool& pool, std::span<const int32_t> pages) {
  check_buffer(in, part.bytes, "unpack_part");
  const KvGeometry& g = plan.geometry;
  const TransferSegment& s = plan.segments.at(part.segment);
  check_pages(s, pool, pages);
  const int64_t ps = pool.page_size(), nt = s.block.tokens(), nu = s.block.units();
  const int64_t layer = s.layer;
  // Runs of tokens that stay inside one page.
  auto for_runs = [&](auto&& body) {
    for (int64_t t = 0; t < nt;) {
      const int64_t lt = s.dst_row + t, slot = lt % ps;
      const int64_t run = std::min(ps - slot, nt - t);
      body(t, pages[static_cast<size_t>(lt / ps)], slot, run);
      t += run;
    }
  };
  if (g.family == ModelFamily::kGqa) {
    const bool keys = part.kind == MessagePart::Kind::kKeys;
    const int64_t d = keys ? g.head_dim : g.head_dim_v;
    const TensorView src(in.data, g.dtype, in.device, {nt, nu, d});
    const TensorView& pool_t = keys ? pool.k(layer) : pool.v(layer);
    for_runs([&](int64_t t, int32_t page, int64_t slot, int64_t run) {
      ops::tensor_copy(pool_t.slice(0, page, 1).slice(1, slot, run).slice(2, s.dst_unit, nu),
                       src.slice(0, t, run).reshape({1, run, nu, d}));
    });
    return;
  }
  const int64_t w = nu + g.rope, units = pool.units();
  const TensorView rows(in.data, g.dtype, in.device, {nt, w});
  for_runs([&](int64_t t, int32_t page, int64_t slot, int64_t run) {
    const TensorView dst = pool.k(layer).slice(0, page, 1).slice(1, slot, run);
    const TensorView r = rows.slice(0, t, run);
    const int64_t s3[] = {1, run, nu}, r3[] = {1, run, g.rope}, st[] = {run * w, w, 1};
    ops::tensor_copy(dst.slice(2, s.dst_unit, nu), TensorView(r.data, g.dtype, r.device, s3, st));
    if (g.rope > 0)
      ops::tensor_copy(
          dst.slice(2, units, g.rope),
          TensorView(static_cast<uint8_t*>(r.data) + nu * static_cast<int64_t>(dtype_size(g.dtype)),
                     g.dtype, r.device, r3, st));
  });
}

void pack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  const LayerKvView& kv, const TensorView& out) {
  check_message(plan, segs, "pack_message");
  check_buffer(out, message_bytes(plan, segs), "pack_message");
  int64_t off = 0;
  for (const MessagePart& p : message_parts(plan, segs)) {
    const TensorView part = byte_view(bytes_at(out, off), p.bytes, out.device);
    if (p.kind == MessagePart::Kind::kHeader)
      write_header(plan, segs, request, kMessageMagic, part);
    else
      pack_part(plan, p, kv, part);
    off += p.bytes;
  }
}

void pack_filler(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                 const TensorView& out) {
  check_message(plan, segs, "pack_filler");
  check_buffer(out, message_bytes(plan, segs), "pack_filler");
  ops::tensor_zero(out);
  write_header(plan, segs, request, kFillerMagic,
               byte_view(out.data, static_cast<int64_t>(sizeof(MessageHeader)), out.device));
}

bool unpack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                    const TensorView& in, KvPool& pool, std::span<const int32_t> pages) {
  check_message(plan, segs, "unpack_message");
  check_buffer(in, message_bytes(plan, segs), "unpack_message");
  int64_t off = 0;
  for (const MessagePart& p : message_parts(plan, segs)) {
    const TensorView part = byte_view(bytes_at(in, off), p.bytes, in.device);
    if (p.kind == MessagePart::Kind::kHeader) {
      if (!check_header(plan, segs, request, part)) return false;
    } else {
      unpack_part(plan, p, part, pool, pages);
    }
    off += p.bytes;
  }
  return true;
}

void write_local_kv(const KvGeometry& g, int64_t layer, int64_t tokens, const LayerKvView& kv,
                    KvPool& pool, std::span<const int32_t> pages) {
  TransferPlan plan;
  plan.geometry = g;
  plan.tokens = tokens;
  TransferSegment s;
  s.layer = layer;
  s.block = {0, tokens, 0, pool.units(), 0};
  plan.segments.push_back(s);
  const size_t seg[] = {0};
  for (const MessagePart& p : message_parts(plan, seg)) {
    if (p.kind == MessagePart::Kind::kHeader) continue;
    const TensorView src = source_bytes(plan, p, kv), dst = dest_bytes(plan, p, pool, pages);
    if (src.data != nullptr && dst.data != nullptr) {
      device_copy(dst.data, dst.device, src.data, src.device, static_cast<size_t>(p.bytes));
    } else if (dst.data != nullptr) {
      pack_part(plan, p, kv, dst);  // pack straight into the pages
    } else {
      Tensor buf = Tensor::empty({p.bytes}, DType::kUInt8, pool.k(layer).device);
      pack_part(plan, p, kv, buf);
      unpack_part(plan, p, buf, pool, pages);
    }
  }
}

}  // namespace distattn::serving
