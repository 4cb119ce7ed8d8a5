// KV message packing (prefill side) and unpacking into pages (decode side), see
// distattn/serving/transfer.h.
#include "distattn/serving/transfer.h"

#include <cstring>

#include "distattn/core/error.h"
#include "distattn/ops/elementwise.h"

namespace distattn::serving {

namespace {

uint8_t* bytes_at(const TensorView& buf, int64_t offset) {
  return static_cast<uint8_t*>(buf.data) + offset;
}

TensorView typed(const TensorView& buf, int64_t offset, DType dtype,
                 std::initializer_list<int64_t> shape) {
  return TensorView(bytes_at(buf, offset), dtype, buf.device, shape);
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
                 ": the message buffer must be packed uint8 [", bytes, "]; got ", buf.str());
}

void write_header(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  int64_t total, uint32_t magic, const TensorView& out) {
  const TransferSegment& s0 = plan.segments[segs[0]];
  MessageHeader hdr;
  hdr.magic = magic;
  hdr.layer = static_cast<uint32_t>(s0.layer);
  hdr.request = request;
  hdr.src = s0.src;
  hdr.dst = s0.dst;
  hdr.payload_bytes = total - static_cast<int64_t>(sizeof(MessageHeader));
  device_copy(out.data, out.device, &hdr, Device::cpu(), sizeof(hdr));
}

}  // namespace

int64_t message_bytes(const TransferPlan& plan, std::span<const size_t> segs) {
  int64_t n = static_cast<int64_t>(sizeof(MessageHeader));
  for (size_t i : segs) n += plan.segment_bytes(plan.segments.at(i));
  return n;
}

void pack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                  const TensorView& k, const TensorView& v, const TensorView& out) {
  constexpr const char* op = "pack_message";
  check_message(plan, segs, op);
  const int64_t total = message_bytes(plan, segs);
  check_buffer(out, total, op);
  const KvGeometry& g = plan.geometry;
  write_header(plan, segs, request, total, kMessageMagic, out);
  const int64_t elt = static_cast<int64_t>(dtype_size(g.dtype));
  int64_t off = static_cast<int64_t>(sizeof(MessageHeader));
  for (size_t i : segs) {
    const TransferSegment& s = plan.segments[i];
    const int64_t nt = s.block.tokens(), nu = s.block.units();
    if (g.family == ModelFamily::kGqa) {
      DISTATTN_CHECK(k.ndim == 3 && v.ndim == 3 && k.dtype == g.dtype && v.dtype == g.dtype &&
                         s.src_row + nt <= k.size(0) && s.src_unit + nu <= k.size(1) &&
                         k.size(2) == g.head_dim && v.size(2) == g.head_dim_v,
                     op, ": k ", k.str(), " / v ", v.str(), " cannot serve rows [", s.src_row, " +",
                     nt, ") units [", s.src_unit, " +", nu, ")");
      ops::tensor_copy(typed(out, off, g.dtype, {nt, nu, g.head_dim}),
                       k.slice(0, s.src_row, nt).slice(1, s.src_unit, nu));
      off += nt * nu * g.head_dim * elt;
      ops::tensor_copy(typed(out, off, g.dtype, {nt, nu, g.head_dim_v}),
                       v.slice(0, s.src_row, nt).slice(1, s.src_unit, nu));
      off += nt * nu * g.head_dim_v * elt;
    } else {
      DISTATTN_CHECK(k.ndim == 2 && k.size(1) == g.latent + g.rope && s.src_row + nt <= k.size(0),
                     op, ": MLA rows ", k.str(), " cannot serve tokens [", s.src_row, " +", nt,
                     ")");
      const int64_t w = nu + g.rope;
      const int64_t shape[] = {nt, w};
      const TensorView dst(bytes_at(out, off), g.dtype, out.device, shape);
      const TensorView rows = k.slice(0, s.src_row, nt);
      ops::tensor_copy(dst.slice(1, 0, nu), rows.slice(1, s.block.unit_begin, nu));
      if (g.rope > 0) ops::tensor_copy(dst.slice(1, nu, g.rope), rows.slice(1, g.latent, g.rope));
      off += nt * w * elt;
    }
  }
}

void pack_filler(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                 const TensorView& out) {
  check_message(plan, segs, "pack_filler");
  const int64_t total = message_bytes(plan, segs);
  check_buffer(out, total, "pack_filler");
  ops::tensor_zero(out);
  write_header(plan, segs, request, total, kFillerMagic, out);
}

bool unpack_message(const TransferPlan& plan, std::span<const size_t> segs, int64_t request,
                    const TensorView& in, KvPool& pool, std::span<const int32_t> pages) {
  constexpr const char* op = "unpack_message";
  check_message(plan, segs, op);
  const int64_t total = message_bytes(plan, segs);
  check_buffer(in, total, op);
  const KvGeometry& g = plan.geometry;
  const TransferSegment& s0 = plan.segments[segs[0]];
  MessageHeader hdr;
  device_copy(&hdr, Device::cpu(), in.data, in.device, sizeof(hdr));
  const bool filler = hdr.magic == kFillerMagic;
  DISTATTN_CHECK_STATUS(
      (hdr.magic == kMessageMagic || filler) && hdr.request == request &&
          hdr.layer == static_cast<uint32_t>(s0.layer) && hdr.src == s0.src && hdr.dst == s0.dst &&
          hdr.payload_bytes == total - static_cast<int64_t>(sizeof(MessageHeader)),
      Status::kInternal, "KV channel out of order: expected request ", request, " layer ", s0.layer,
      " from prefill rank ", s0.src, " to decode rank ", s0.dst, " (", total, " bytes), got ",
      hdr.magic == kMessageMagic || filler ? "" : "a message without the KV magic, or ", "request ",
      hdr.request, " layer ", hdr.layer, " from ", hdr.src, " to ", hdr.dst, " (",
      hdr.payload_bytes, " payload bytes)");
  if (filler) return false;
  const int64_t ps = pool.page_size(), elt = static_cast<int64_t>(dtype_size(g.dtype));
  const int64_t layer = s0.layer;
  int64_t off = static_cast<int64_t>(sizeof(MessageHeader));
  for (size_t i : segs) {
    const TransferSegment& s = plan.segments[i];
    const int64_t nt = s.block.tokens(), nu = s.block.units();
    DISTATTN_CHECK((s.dst_row + nt + ps - 1) / ps <= static_cast<int64_t>(pages.size()) &&
                       s.dst_unit + nu <= pool.units(),
                   op, ": the request's ", pages.size(), " pages (", pool.units(),
                   " units) cannot hold local tokens [", s.dst_row, " +", nt, ") units [",
                   s.dst_unit, " +", nu, ")");
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
      const int64_t koff = off, voff = off + nt * nu * g.head_dim * elt;
      const TensorView kin = typed(in, koff, g.dtype, {nt, nu, g.head_dim});
      const TensorView vin = typed(in, voff, g.dtype, {nt, nu, g.head_dim_v});
      for_runs([&](int64_t t, int32_t page, int64_t slot, int64_t run) {
        ops::tensor_copy(
            pool.k(layer).slice(0, page, 1).slice(1, slot, run).slice(2, s.dst_unit, nu),
            kin.slice(0, t, run).reshape({1, run, nu, g.head_dim}));
        ops::tensor_copy(
            pool.v(layer).slice(0, page, 1).slice(1, slot, run).slice(2, s.dst_unit, nu),
            vin.slice(0, t, run).reshape({1, run, nu, g.head_dim_v}));
      });
      off = voff + nt * nu * g.head_dim_v * elt;
    } else {
      const int64_t w = nu + g.rope, units = pool.units();
      const int64_t shape[] = {nt, w};
      const TensorView rows(bytes_at(in, off), g.dtype, in.device, shape);
      for_runs([&](int64_t t, int32_t page, int64_t slot, int64_t run) {
        const TensorView dst = pool.k(layer).slice(0, page, 1).slice(1, slot, run);
        const TensorView src = rows.slice(0, t, run);
        const int64_t s3[] = {1, run, nu}, r3[] = {1, run, g.rope};
        ops::tensor_copy(
            dst.slice(2, s.dst_unit, nu),
            TensorView(src.data, g.dtype, src.device, s3, std::array<int64_t, 3>{run * w, w, 1}));
        if (g.rope > 0)
          ops::tensor_copy(dst.slice(2, units, g.rope),
                           TensorView(static_cast<uint8_t*>(src.data) + nu * elt, g.dtype,
                                      src.device, r3, std::array<int64_t, 3>{run * w, w, 1}));
      });
      off += nt * w * elt;
    }
  }
  return true;
}

void write_local_kv(const KvGeometry& g, int64_t layer, int64_t tokens, const TensorView& k,
                    const TensorView& v, KvPool& pool, std::span<const int32_t> pages) {
  TransferPlan plan;
  plan.geometry = g;
  plan.tokens = tokens;
  TransferSegment s;
  s.layer = layer;
  s.block = {0, tokens, 0, pool.units(), 0};
  plan.segments.push_back(s);
  const size_t seg[] = {0};
  Tensor buf = Tensor::empty({message_bytes(plan, seg)}, DType::kUInt8, k.device);
  pack_message(plan, seg, 0, k, v, buf);
  unpack_message(plan, seg, 0, buf, pool, pages);
}

}  // namespace distattn::serving
