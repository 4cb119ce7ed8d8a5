// The MLA decode shardings' attention cores with device tensors and pages on this rank's GPU
// (ranks share one GPU; decode-CP's all-gather goes through the MPI backend staging device
// memory), against the same calls on CPU tensors and against an fp64 decode over the same
// (rounded) cache, at np 1/2/4, fp32 and bf16 caches, DeepSeek widths (latent 512, rope 64,
// page 64):
//   MLA-TP     ops::mla_decode on this rank's heads of a replicated cache; the heads of all
//              ranks together rebuild the full decode.
//   TPLA       tpla_shard_attention on reshard_to_tpla's latent slice (Hadamard rotation, g = P
//              groups: slice widths 512/256/128) with a non-unit per-shard logit scale mu.
//   decode-CP  decode_cp_attention over reshard_to_decode_cp's round-robin pages: the merged
//              result equals attention over the whole cache, also when some ranks hold no token
//              (their partial is lse = -inf and must merge without NaN).
// Work goes on a user-created non-blocking stream; outputs start as NaN poison and are read
// after synchronizing that stream; decode-CP's queries are written on that stream late (behind
// a delay on GPU ranks) and poisoned on it right after the call. The suite runs on CPU tensors too
// (OnCpu, everywhere), so CPU-only CI proves the test logic; OnCuda skips on every rank alike
// without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/test_data.h"
#include "distattn/comm/communicator.h"
#include "distattn/ops/elementwise.h"
#include "distattn/ops/mla.h"
#include "distattn/parallel/mla.h"
#include "distattn/parallel/sequence_parallel.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/sp_device_util.h"

namespace distattn::parallel {
namespace {

using testing::compare;
using testing::ErrorStats;
using testing::fill_test_data;
using testing::poisoned;
using testing::test_value;
using testing::to_double_vector;
using testing::sp_device::device_world;
using testing::sp_device::DeviceWorld;
using testing::sp_device::gpu_usable;
using testing::sp_device::host_world;
using testing::sp_device::UserStream;

constexpr int64_t kLatent = 512, kRope = 64, kPage = 64, kHeads = 16;
constexpr float kScale = 0.1352f;  // DeepSeek-V3's YaRN-scaled softmax scale

// fp64 MLA decode over a host paged cache (what ops::mla_decode computes, mla.h):
//   s[t] = scale * (mu * q_lat[h] . c_t + q_pe[h] . k_pe_t), out = softmax(s) c, lse = log sum e^s
// q_lat [B, H, Dl], q_pe [B, H, Dr] packed fp32 host tensors. Returns out [B, H, Dl], lse [B, H].
struct DecodeRef {
  std::vector<double> out, lse;
};
DecodeRef reference_decode(const ops::MlaPagedCache& c, const Tensor& q_lat, const Tensor& q_pe,
                           double scale, double mu) {
  const std::vector<double> pv = to_double_vector(c.pages);
  const int64_t B = q_lat.view().size(0), H = q_lat.view().size(1), Dl = c.latent_dim;
  const int64_t Dr = c.rope_dim(), W = Dl + Dr, ps = c.page_size();
  const float* ql = q_lat.data_as<float>();
  const float* qp = q_pe.data_as<float>();
  DecodeRef r;
  r.out.assign(static_cast<size_t>(B * H * Dl), 0.0);
  r.lse.assign(static_cast<size_t>(B * H), -INFINITY);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = c.seq_lens.data_as<int32_t>()[b * c.seq_lens.stride(0)];
    auto row = [&](int64_t t) {
      const int64_t pg =
          c.page_table
              .data_as<int32_t>()[b * c.page_table.stride(0) + (t / ps) * c.page_table.stride(1)];
      return pv.data() + (pg * ps + t % ps) * W;
    };
    for (int64_t h = 0; h < H && len > 0; ++h) {
      std::vector<double> s(static_cast<size_t>(len));
      double mx = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        const double* rw = row(t);
        double lat = 0, pe = 0;
        for (int64_t d = 0; d < Dl; ++d) lat += ql[(b * H + h) * Dl + d] * rw[d];
        for (int64_t d = 0; d < Dr; ++d) pe += qp[(b * H + h) * Dr + d] * rw[Dl + d];
        s[static_cast<size_t>(t)] = scale * (mu * lat + pe);
        mx = std::max(mx, s[static_cast<size_t>(t)]);
      }
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      r.lse[static_cast<size_t>(b * H + h)] = mx + std::log(sum);
      for (int64_t t = 0; t < len; ++t) {
        const double* rw = row(t);
        for (int64_t d = 0; d < Dl; ++d)
          r.out[static_cast<size_t>((b * H + h) * Dl + d)] +=
              s[static_cast<size_t>(t)] / sum * rw[d];
      }
    }
  }
  return r;
}

// A paged cache's tensors on `dev` (copies) and the view over them.
struct CacheOn {
  Tensor pages, page_table, seq_lens;
  ops::MlaPagedCache view;
};
CacheOn cache_on(const ops::MlaPagedCache& c, Device dev) {
  CacheOn d;
  d.pages = to_device(c.pages, dev);
  d.page_table = to_device(c.page_table, dev);
  d.seq_lens = to_device(c.seq_lens, dev);
  d.view = {d.pages.view(), d.page_table.view(), d.seq_lens.view(), c.latent_dim};
  return d;
}

// fp32 host tensor of `shape` with test values (seed, id).
Tensor host_input(std::initializer_list<int64_t> shape, uint64_t seed, uint64_t id) {
  Tensor t = Tensor::empty(shape, DType::kFloat32);
  fill_test_data(t.view(), seed, id);
  return t;
}

// One sequence's latent cache of `len` tokens (capacity `cap`) in `dtype`: test values, the
// latent part scaled to unit RMS-like magnitude as a normalized latent is.
MlaCache make_cache(int64_t len, int64_t cap, DType dtype, uint64_t seed) {
  MlaCache c(cap, kPage, kLatent, kRope, dtype);
  std::vector<float> lat(static_cast<size_t>(len * kLatent)), pe(static_cast<size_t>(len * kRope));
  for (size_t i = 0; i < lat.size(); ++i)
    lat[i] = static_cast<float>(1.7 * test_value(seed, 100, i));  // U(-1.7,1.7): RMS ~ 1
  for (size_t i = 0; i < pe.size(); ++i) pe[i] = static_cast<float>(test_value(seed, 101, i));
  c.append(lat.data(), pe.data(), len);
  return c;
}

// got (read after the stream sync) vs the fp64 reference and vs the CPU call's result: fp32
// accumulation over a few hundred tokens of 576-wide rows, 1e-5 of max |ref| (as the kernels'
// own tests), both against fp64 and against each other.
void expect_close(const char* what, const std::vector<double>& got, const std::vector<double>& ref,
                  const std::vector<double>& cpu) {
  const ErrorStats e = compare(got, ref);
  EXPECT_EQ(e.non_finite, 0) << what << ": non-finite values (NaN poison left?)";
  EXPECT_LE(e.max_abs_err, 1e-5 * e.max_ref)
      << what << " vs fp64: max abs error " << e.max_abs_err << ", max |ref| " << e.max_ref;
  const ErrorStats x = compare(got, cpu);
  EXPECT_EQ(x.non_finite, 0) << what;
  EXPECT_LE(x.max_abs_err, 1e-5 * x.max_ref)
      << what << " vs the CPU call: max abs error " << x.max_abs_err << ", max |cpu| " << x.max_ref;
}

using Param = std::tuple<DeviceType, DType>;  // where the call runs, cache dtype

class MlaShardingOnDevice : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    // One all-ranks decision: no rank skips while another enters a collective.
    if (std::get<0>(GetParam()) == DeviceType::kCUDA && !gpu_usable())
      GTEST_SKIP() << "skipped: no GPU (or a build without CUDA)";
  }
  DeviceWorld& world() { return device_world(std::get<0>(GetParam())); }
  Device dev() { return world().device; }
  DType cache_dtype() const { return std::get<1>(GetParam()); }
  std::string trace() {
    return std::string(dtype_name(cache_dtype())) + " cache on " + dev().str() +
           " P=" + std::to_string(world().comm->size());
  }
};

TEST_P(MlaShardingOnDevice, MlaTpHeadSplitMatchesFp64AndTheCpuCall) {
  SCOPED_TRACE(trace());
  comm::Communicator& w = *world().comm;
  const int p = w.size(), r = w.rank();
  // Two sequences of a batch (300 and 77 tokens) in interleaved, out-of-order pages.
  const std::vector<int32_t> lens = {300, 77};
  const int64_t B = 2, max_pages = 5, num_pages = B * max_pages + 1;
  Tensor pages = Tensor::empty({num_pages, kPage, kLatent + kRope}, cache_dtype());
  fill_test_data(pages.view(), 31, 0);
  Tensor pt = Tensor::empty({B, max_pages}, DType::kInt32), sl = Tensor::empty({B}, DType::kInt32);
  for (int64_t b = 0; b < B; ++b) {
    sl.data_as<int32_t>()[b] = lens[static_cast<size_t>(b)];
    for (int64_t i = 0; i < max_pages; ++i)
      pt.data_as<int32_t>()[b * max_pages + i] = static_cast<int32_t>(num_pages - 1 - (i * B + b));
  }
  const ops::MlaPagedCache host{pages.view(), pt.view(), sl.view(), kLatent};
  const Tensor q_lat = host_input({B, kHeads, kLatent}, 31, 1);
  const Tensor q_pe = host_input({B, kHeads, kRope}, 31, 2);
  const DecodeRef full = reference_decode(host, q_lat, q_pe, kScale, 1.0);

  // This rank's heads (MLA-TP splits heads; the cache is replicated).
  const HeadRange hr = split_heads(kHeads, p, r);
  ASSERT_GT(hr.size(), 0);
  const Tensor ql = to_device(q_lat.view().slice(1, hr.begin, hr.size()), Device::cpu());
  const Tensor qp = to_device(q_pe.view().slice(1, hr.begin, hr.size()), Device::cpu());
  ops::MlaDecodeOptions o;
  o.softmax_scale = kScale;
  const DecodeRef mine = reference_decode(host, ql, qp, kScale, 1.0);
  Tensor out_cpu = Tensor::empty({B, hr.size(), kLatent}, DType::kFloat32);
  Tensor lse_cpu = Tensor::empty({B, hr.size()}, DType::kFloat32);
  ops::mla_decode(ql, qp, host, out_cpu, lse_cpu, o);

  const CacheOn dc = cache_on(host, dev());
  const Tensor ql_d = to_device(ql.view(), dev()), qp_d = to_device(qp.view(), dev());
  const Tensor out = poisoned({B, hr.size(), kLatent}, DType::kFloat32, dev());
  const Tensor lse = poisoned({B, hr.size()}, DType::kFloat32, dev());
  UserStream stream(dev());
  o.stream = stream.get();
  ops::mla_decode(ql_d, qp_d, dc.view, out, lse, o);
  stream.synchronize();
  const std::vector<double> got_out = to_double_vector(out), got_lse = to_double_vector(lse);
  expect_close("out", got_out, mine.out, to_double_vector(out_cpu));
  expect_close("lse", got_lse, mine.lse, to_double_vector(lse_cpu));

  // Every rank's heads together: the full decode, each head exactly once.
  std::vector<double> all(static_cast<size_t>(B * kHeads * kLatent), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < hr.size(); ++h)
      std::copy_n(got_out.begin() + (b * hr.size() + h) * kLatent, kLatent,
                  all.begin() + (b * kHeads + hr.begin + h) * kLatent);
  host_world().all_reduce(all.data(), all.data(), all.size(), DType::kFloat64,
                          comm::ReduceOp::kSum);
  const ErrorStats e = compare(all, full.out);
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_LE(e.max_abs_err, 1e-5 * e.max_ref) << "heads of all ranks vs the full fp64 decode";
}

TEST_P(MlaShardingOnDevice, TplaShardAttentionMatchesFp64AndTheCpuCall) {
  SCOPED_TRACE(trace());
  comm::Communicator& w = *world().comm;
  // g = TP (one latent group per rank) when it divides the latent width (P = 1, 2, 4 -> slice
  // widths 512, 256, 128); otherwise one group.
  const int g = kLatent % w.size() == 0 ? w.size() : 1, group = w.rank() % g;
  const int64_t len = 300, cap = 320;
  TplaReparam rp = make_tpla_reparam(kLatent, g, TplaRotation::kHadamard, /*seed=*/5);
  ASSERT_EQ(static_cast<int>(rp.mu.size()), g);
  // Per-shard logit scales away from 1, so a kernel that ignored mu would fail.
  for (int i = 0; i < g; ++i) rp.mu[static_cast<size_t>(i)] = 0.85f + 0.1f * static_cast<float>(i);
  const MlaCache full = make_cache(len, cap, cache_dtype(), 41);
  const MlaCache shard = reshard_to_tpla(full, rp, group, cap);
  ASSERT_EQ(shard.length(), len);
  ASSERT_EQ(shard.latent_dim(), kLatent / g);
  const int64_t w_slice = rp.slice_width();
  const Tensor q_lat = host_input({1, kHeads, w_slice}, 41, 10 + static_cast<uint64_t>(group));
  const Tensor q_pe = host_input({1, kHeads, kRope}, 41, 20);
  const ops::MlaPagedCache host = shard.view();
  const DecodeRef ref =
      reference_decode(host, q_lat, q_pe, kScale, rp.mu[static_cast<size_t>(group)]);

  ops::MlaDecodeOptions o;
  o.softmax_scale = kScale;
  o.latent_logit_scale = 1.0f;  // overwritten with mu[group] by tpla_shard_attention
  Tensor out_cpu = Tensor::empty({1, kHeads, w_slice}, DType::kFloat32);
  Tensor lse_cpu = Tensor::empty({1, kHeads}, DType::kFloat32);
  tpla_shard_attention(rp, group, q_lat, q_pe, host, out_cpu, lse_cpu, o);

  const CacheOn dc = cache_on(host, dev());
  const Tensor ql_d = to_device(q_lat.view(), dev()), qp_d = to_device(q_pe.view(), dev());
  const Tensor out = poisoned({1, kHeads, w_slice}, DType::kFloat32, dev());
  const Tensor lse = poisoned({1, kHeads}, DType::kFloat32, dev());
  UserStream stream(dev());
  o.stream = stream.get();
  tpla_shard_attention(rp, group, ql_d, qp_d, dc.view, out, lse, o);
  stream.synchronize();
  expect_close("out", to_double_vector(out), ref.out, to_double_vector(out_cpu));
  expect_close("lse", to_double_vector(lse), ref.lse, to_double_vector(lse_cpu));
}

TEST_P(MlaShardingOnDevice, DecodeCpMergedResultMatchesAttentionOverTheWholeCache) {
  SCOPED_TRACE(trace());
  DeviceWorld& dw = world();
  comm::Communicator& w = *dw.comm;
  comm::Communicator& cpu_world = *device_world(DeviceType::kCPU).comm;
  const int p = w.size(), r = w.rank();
  const int64_t cap = 320;  // 5 pages
  // 300 tokens: every rank holds pages; 100 tokens (2 pages): at P = 4 ranks 2 and 3 hold none.
  for (int64_t len : {int64_t{300}, int64_t{100}}) {
    SCOPED_TRACE("tokens " + std::to_string(len));
    const MlaCache full = make_cache(len, cap, cache_dtype(), 51 + static_cast<uint64_t>(len));
    const MlaCache local = reshard_to_decode_cp(full, r, p, cap);
    int64_t tokens = local.length();
    host_world().all_reduce(&tokens, &tokens, 1, DType::kInt64, comm::ReduceOp::kSum);
    ASSERT_EQ(tokens, len) << "decode-CP shards hold every token once";
    const Tensor q_lat = host_input({1, kHeads, kLatent}, 51, 1);
    const Tensor q_pe = host_input({1, kHeads, kRope}, 51, 2);
    const DecodeRef ref = reference_decode(full.view(), q_lat, q_pe, kScale, 1.0);

    ops::MlaDecodeOptions o;
    o.softmax_scale = kScale;
    Tensor out_cpu = Tensor::empty({1, kHeads, kLatent}, DType::kFloat32);
    Tensor lse_cpu = Tensor::empty({1, kHeads}, DType::kFloat32);
    decode_cp_attention(cpu_world, q_lat, q_pe, local.view(), out_cpu, lse_cpu, o);

    const CacheOn dc = cache_on(local.view(), dw.device);
    const Tensor ql_src = to_device(q_lat.view(), dw.device);
    const Tensor qp_src = to_device(q_pe.view(), dw.device);
    const Tensor out = poisoned({1, kHeads, kLatent}, DType::kFloat32, dw.device);
    const Tensor lse = poisoned({1, kHeads}, DType::kFloat32, dw.device);
    UserStream stream(dw.device);
    o.stream = stream.get();
    // The queries are written on the user stream right before the call, behind a delay on
    // GPU ranks (the decode kernel and the all-gather's staging must be ordered after it),
    // and poisoned on it right after the call (nothing of the call may read them later).
    const Tensor ql_d = poisoned({1, kHeads, kLatent}, DType::kFloat32, dw.device);
    const Tensor qp_d = poisoned({1, kHeads, kRope}, DType::kFloat32, dw.device);
    stream.delay(20);
    ops::tensor_copy(ql_d.view(), ql_src.view(), stream.get());
    ops::tensor_copy(qp_d.view(), qp_src.view(), stream.get());
    const uint64_t gathered0 = w.ledger()[comm::OpKind::kAllGather].bytes_sent;
    decode_cp_attention(w, ql_d, qp_d, dc.view, out, lse, o);
    for (const Tensor* t : {&ql_d, &qp_d})
      ops::tensor_fill(t->view(), std::numeric_limits<double>::quiet_NaN(), stream.get());
    stream.synchronize();
    expect_close("out", to_double_vector(out), ref.out, to_double_vector(out_cpu));
    expect_close("lse", to_double_vector(lse), ref.lse, to_double_vector(lse_cpu));
    // One all-gather of the fp32 partials [H, Dl] + lse [H] (as the CPU decoder's formula).
    EXPECT_EQ(w.ledger()[comm::OpKind::kAllGather].bytes_sent - gathered0,
              static_cast<uint64_t>(kHeads * (kLatent + 1) * 4) * static_cast<uint64_t>(p - 1));
  }
}

// decode-CP with device queries but host pages is rejected on every rank before the all-gather
// (a GPU-only check: on CPU ranks there is no second device).
TEST(MlaShardingOnCudaErrors, DecodeCpWithPagesOnAnotherDeviceIsRejectedBeforeTheAllGather) {
  if (!gpu_usable()) GTEST_SKIP() << "skipped: no GPU (or a build without CUDA)";
  DeviceWorld& dw = device_world(DeviceType::kCUDA);
  comm::Communicator& w = *dw.comm;
  const MlaCache full = make_cache(100, 128, DType::kFloat32, 61);
  const MlaCache local = reshard_to_decode_cp(full, w.rank(), w.size(), 128);
  const Tensor q_lat = to_device(host_input({1, kHeads, kLatent}, 61, 1).view(), dw.device);
  const Tensor q_pe = to_device(host_input({1, kHeads, kRope}, 61, 2).view(), dw.device);
  const Tensor out = Tensor::zeros({1, kHeads, kLatent}, DType::kFloat32, dw.device);
  const Tensor lse = Tensor::zeros({1, kHeads}, DType::kFloat32, dw.device);
  ops::MlaDecodeOptions o;
  o.softmax_scale = kScale;
  const uint64_t calls0 = w.ledger()[comm::OpKind::kAllGather].calls;
  EXPECT_THROW(decode_cp_attention(w, q_lat, q_pe, local.view(), out, lse, o), Error);
  EXPECT_EQ(w.ledger()[comm::OpKind::kAllGather].calls, calls0);
}

std::string param_name(const ::testing::TestParamInfo<Param>& i) {
  return std::string(std::get<0>(i.param) == DeviceType::kCUDA ? "cuda_" : "cpu_") +
         dtype_name(std::get<1>(i.param)) + "_cache";
}

INSTANTIATE_TEST_SUITE_P(OnCpu, MlaShardingOnDevice,
                         ::testing::Combine(::testing::Values(DeviceType::kCPU),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16)),
                         param_name);
INSTANTIATE_TEST_SUITE_P(OnCuda, MlaShardingOnDevice,
                         ::testing::Combine(::testing::Values(DeviceType::kCUDA),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16)),
                         param_name);

}  // namespace
}  // namespace distattn::parallel
