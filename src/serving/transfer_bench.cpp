// The KV transfer measured alone (distattn/serving/engine.h: bench_transfer).
#include <algorithm>
#include <chrono>

#include "distattn/core/error.h"
#include "distattn/core/random.h"
#include "distattn/ops/elementwise.h"
#include "src/serving/engine_internal.h"

namespace distattn::serving {

using namespace detail;

namespace {

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Random values for a tensor on any device.
void fill(const Tensor& t, uint64_t stream) {
  Tensor f = uniform_matrix_block(7, stream, 1, t.numel(), t.numel(), 0, 0, 1.0);
  const int64_t n = t.numel();
  Tensor h = Tensor::empty({n}, t.dtype());
  ops::tensor_copy(h, f.view().reshape({n}));
  device_copy(t.data(), t.device(), h.data(), Device::cpu(), t.nbytes());
}

}  // namespace

TransferBenchResult bench_transfer(comm::Communicator& world, const EngineOptions& opts,
                                   int64_t tokens, int iters, int warmup) {
  validate(opts, world.size());
  DISTATTN_CHECK(tokens >= 1 && iters >= 1 && warmup >= 0,
                 "bench_transfer: tokens >= 1, iters >= 1, warmup >= 0");
  const int P = opts.prefill.ranks, wr = world.rank();
  const bool prefill = wr < P;
  const int me = prefill ? wr : wr - P;
  std::unique_ptr<comm::Communicator> device_world;
  if (opts.device.is_cuda()) device_world = comm::create_world(opts.backend, opts.device);
  std::unique_ptr<comm::Communicator> kv = (device_world ? *device_world : world).split(0, wr);
  const Device dev = opts.device;
  const KvGeometry g = opts.model.geometry(opts.decode.page_size);
  const auto plan = std::make_shared<TransferPlan>(
      make_transfer_plan(g, opts.prefill, opts.decode.layout, tokens));

  // This rank's KV of one layer, as the model would hand it over.
  Tensor k, v;
  std::unique_ptr<KvPool> pool;
  std::vector<int32_t> pages;
  if (prefill) {
    if (g.family == ModelFamily::kGqa) {
      int64_t rows = tokens, units = g.kv_heads;
      if (opts.prefill.sharding == PrefillSharding::kHeads) {
        units = prefill_holdings(g, opts.prefill, me, tokens).front().units();
      } else {
        rows = opts.prefill.padded_length(tokens) / P;
      }
      k = Tensor::empty({rows, units, g.head_dim}, g.dtype, dev);
      v = Tensor::empty({rows, units, g.head_dim_v}, g.dtype, dev);
      fill(k, 1);
      fill(v, 2);
    } else {
      k = Tensor::empty({tokens, g.latent + g.rope}, DType::kFloat32);
      fill(k, 3);
    }
  } else {
    pool = std::make_unique<KvPool>(g, decode_units(g, opts.decode.layout, me).units(),
                                    decode_pages_needed(g, opts.decode.layout, me, tokens), dev);
    pages = *pool->allocate(pool->num_pages());
  }

  TransferBenchResult res;
  res.tokens = tokens;
  res.bytes = plan->total_bytes();
  for (int64_t l = 0; l < g.layers; ++l)
    for (int s = 0; s < P; ++s)
      for (int d = 0; d < opts.decode.layout.ranks; ++d) {
        const std::vector<size_t> segs = plan->message(l, s, d);
        if (segs.empty()) continue;
        ++res.messages;
        res.max_message = std::max(res.max_message, message_bytes(*plan, segs));
      }

  // The engine path: pack, post, receive, unpack (staging buffers and the sender reused
  // across iterations, as the engine reuses them across requests).
  BufferCache staging(dev);
  KvSender sender(*kv, P, dev);
  OwnedStream recv_stream(dev);
  double total = 0;
  for (int it = 0; it < warmup + iters; ++it) {
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    if (prefill) {
      for (int64_t l = 0; l < g.layers; ++l)
        sender.send_layer(*plan, me, l, it, LayerKv{{k, v}, k, v});
      sender.wait_all();
    } else {
      KvReceiver recv(*kv, plan, me, it, *pool, pages, staging, recv_stream.get());
      while (!recv.poll(*pool, pages)) {
      }
    }
    double t = seconds(t0);
    world.all_reduce(&t, &t, 1, DType::kFloat64, comm::ReduceOp::kMax);
    if (it >= warmup) total += t;
  }
  res.transfer_s = total / iters;

  // The same parts (the same message sizes) as plain send/recv between the same pairs, buffers
  // allocated and touched once.
  std::vector<Tensor> bufs;
  std::vector<comm::P2POp> ops;
  for (int64_t l = 0; l < g.layers; ++l)
    for (int s = 0; s < P; ++s)
      for (int d = 0; d < opts.decode.layout.ranks; ++d) {
        const std::vector<size_t> segs = plan->message(l, s, d);
        if (segs.empty() || (prefill ? s != me : d != me)) continue;
        for (const MessagePart& part : message_parts(*plan, segs)) {
          bufs.push_back(Tensor::zeros({part.bytes}, DType::kUInt8, dev));
          const Tensor& b = bufs.back();
          ops.push_back(prefill ? comm::P2POp::send(b.data(), b.nbytes(), DType::kUInt8, P + d)
                                : comm::P2POp::recv(b.data(), b.nbytes(), DType::kUInt8, s));
        }
      }
  total = 0;
  for (int it = 0; it < warmup + iters; ++it) {
    world.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    if (!ops.empty()) kv->group(ops);
    double t = seconds(t0);
    world.all_reduce(&t, &t, 1, DType::kFloat64, comm::ReduceOp::kMax);
    if (it >= warmup) total += t;
  }
  res.raw_s = total / iters;
  if (pool) pool->release(pages);
  return res;
}

}  // namespace distattn::serving
