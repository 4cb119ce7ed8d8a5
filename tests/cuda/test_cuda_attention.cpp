// CUDA attention kernels against the fp64 CPU reference: forward (tensor-core and
// CUDA-core paths), backward, split-KV decode (contiguous and paged), merge. Fresh
// deterministic inputs, NaN-poisoned outputs, explicit NaN checks, odd and even sizes.
// Skips cleanly without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "distattn/config.h"
#include "tests/cuda/cuda_test_util.h"
#include "unit/attention_test_util.h"
#if DISTATTN_WITH_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/attention_cuda.h"
#endif

namespace distattn::testing {
namespace {

#if DISTATTN_WITH_CUDA
namespace kc = kernels::cuda;

struct FwdCase {
  const char* name;
  int64_t B, Sq, Sk, Hq, Hkv, D, Dv;
  bool causal;
  int64_t q_offset, k_offset, wl, wr;
};

// Sizes odd and even; every mask; GQA; D != Dv; rows with no visible key (k_offset past
// the queries under causal).
const FwdCase kFwdCases[] = {
    {"full_d64", 2, 67, 131, 4, 2, 64, 64, false, 0, 0, -1, -1},
    {"causal_d128_end", 1, 130, 130, 2, 1, 128, 128, true, 0, 0, -1, -1},
    {"causal_d128_tail", 1, 33, 200, 4, 4, 128, 128, true, 167, 0, -1, -1},
    {"window_d64", 1, 150, 150, 3, 1, 64, 64, false, 0, 0, 20, 5},
    {"mla_prefill_d192", 1, 77, 77, 2, 2, 192, 128, true, 0, 0, -1, -1},
    {"masked_rows_d64", 1, 96, 64, 2, 1, 64, 64, true, 0, 50, -1, -1},
    {"odd_dims", 2, 19, 45, 6, 3, 40, 24, true, 26, 0, -1, -1},
    {"wide_d256", 1, 9, 70, 2, 1, 256, 256, false, 0, 0, 30, -1},
    // Global positions as in a 1M-token zigzag step (keys straddle the queries' diagonal)
    // and past 2^31 (int32 truncation) and 2^24 (positions through float lose exactness).
    // A wide window: tiles inside both the window and the causal bound, tiles on its edges.
    {"window_wide_d128", 1, 260, 260, 2, 1, 128, 128, true, 0, 0, 150, -1},
    {"offset_1m_causal_d128", 1, 70, 150, 2, 1, 128, 128, true, 1048000, 1047950, -1, -1},
    {"offset_3e9_window_d64", 2, 40, 90, 2, 2, 64, 64, true, 3000000000LL, 2999999980LL, 16, -1},
    {"offset_3e9_simt_d40", 1, 21, 50, 2, 1, 40, 40, false, 3000000007LL, 3000000000LL, 9, 4},
};

ops::AttentionOptions options_of(const FwdCase& c) {
  ops::AttentionOptions o;
  o.causal = c.causal;
  o.q_offset = c.q_offset;
  o.k_offset = c.k_offset;
  o.window_left = c.wl;
  o.window_right = c.wr;
  return o;
}

struct DeviceInputs {
  Tensor q, k, v;     // host
  Tensor dq, dk, dv;  // device copies
};

DeviceInputs make_inputs(const FwdCase& c, DType dt, uint64_t seed) {
  DeviceInputs in;
  in.q = make_input({c.B, c.Sq, c.Hq, c.D}, dt, seed, 0);
  in.k = make_input({c.B, c.Sk, c.Hkv, c.D}, dt, seed, 1);
  in.v = make_input({c.B, c.Sk, c.Hkv, c.Dv}, dt, seed, 2);
  in.dq = to_device(in.q.view(), gpu());
  in.dk = to_device(in.k.view(), gpu());
  in.dv = to_device(in.v.view(), gpu());
  return in;
}

enum class Path { kDefault, kSimt };

void check_forward(const FwdCase& c, DType dt, DType out_dt, Path path) {
  SCOPED_TRACE(std::string(c.name) + " " + dtype_name(dt) + " -> " + dtype_name(out_dt) +
               (path == Path::kSimt ? " simt" : ""));
  const DeviceInputs in = make_inputs(c, dt, 1000 + static_cast<uint64_t>(c.Sq));
  Tensor out = poisoned({c.B, c.Sq, c.Hq, c.Dv}, out_dt, gpu());
  Tensor lse = poisoned({c.B, c.Hq, c.Sq}, DType::kFloat32, gpu());
  const ops::AttentionOptions o = options_of(c);
  if (path == Path::kSimt)
    kc::flash_forward_simt(in.dq, in.dk, in.dv, out, lse, o);
  else
    kc::flash_forward(in.dq, in.dk, in.dv, out, lse, o);
  const auto ref = kernels::cpu::reference_attention_forward(in.q, in.k, in.v, o);
  expect_close(out, ref.out, tolerance(dt), "out");
  expect_close(lse, ref.lse, 1e-5, "lse");
}

class CudaAttention : public ::testing::Test {
 protected:
  void SetUp() override { DISTATTN_SKIP_WITHOUT_GPU(); }
};

TEST_F(CudaAttention, ForwardMatchesReferenceEveryDtypeAndMask) {
  for (const FwdCase& c : kFwdCases)
    for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
      check_forward(c, dt, dt, Path::kDefault);
}

TEST_F(CudaAttention, CudaCoreForwardMatchesReference) {
  for (const FwdCase& c : kFwdCases)
    for (DType dt : {DType::kBFloat16, DType::kFloat16}) check_forward(c, dt, dt, Path::kSimt);
}

TEST_F(CudaAttention, ForwardWritesFp32PartialsFrom16BitInputs) {
  for (const FwdCase& c : kFwdCases)
    check_forward(c, DType::kBFloat16, DType::kFloat32, Path::kDefault);
}

TEST_F(CudaAttention, TensorCoresTakeAlignedHeadDims64And128And192) {
  for (auto [d, dv, expect] :
       {std::tuple{64, 64, true}, std::tuple{128, 128, true}, std::tuple{192, 128, true},
        std::tuple{96, 96, false}, std::tuple{128, 64, false}}) {
    const FwdCase c{"probe", 1, 8, 8, 2, 1, d, dv, false, 0, 0, -1, -1};
    const DeviceInputs in = make_inputs(c, DType::kBFloat16, 7);
    EXPECT_EQ(kc::flash_forward_uses_tensor_cores(in.dq, in.dk, in.dv), expect) << d << "/" << dv;
    const DeviceInputs f = make_inputs(c, DType::kFloat32, 7);
    EXPECT_FALSE(kc::flash_forward_uses_tensor_cores(f.dq, f.dk, f.dv));
  }
}

// A device view of a host tensor with padded seq and head strides (pads in elements).
struct StridedDevice {
  Tensor storage;
  TensorView view;
};
StridedDevice strided_copy(const Tensor& host, int64_t head_pad, int64_t seq_pad,
                           int64_t batch_pad) {
  const TensorView& h = host.view();
  const int64_t s0 = h.size(0), s1 = h.size(1), s2 = h.size(2), s3 = h.size(3);
  const int64_t hs = s3 + head_pad, ss = s2 * hs + seq_pad, bs = s1 * ss + batch_pad;
  Tensor padded = Tensor::zeros({s0 * bs}, h.dtype);
  const int64_t shape[4] = {s0, s1, s2, s3}, strides[4] = {bs, ss, hs, 1};
  const TensorView pv(padded.data(), h.dtype, Device::cpu(), shape, strides);
  copy_into(h, pv);
  StridedDevice d;
  d.storage = to_device(padded.view(), gpu());
  d.view = TensorView(d.storage.data(), h.dtype, gpu(), shape, strides);
  return d;
}

// Strided q/k/v/out/lse: padded rows 16-byte aligned (tensor cores) and unaligned (CUDA
// cores), and a transposed lse view.
TEST_F(CudaAttention, ForwardHonoursStrides) {
  for (bool aligned : {true, false}) {
    const int64_t B = 2, Sq = 70, Sk = 97, Hq = 4, Hkv = 2, D = 128;
    const DType dt = DType::kBFloat16;
    Tensor q = make_input({B, Sq, Hq, D}, dt, 77, 0);
    Tensor k = make_input({B, Sk, Hkv, D}, dt, 77, 1);
    Tensor v = make_input({B, Sk, Hkv, D}, dt, 77, 2);
    const int64_t pad = aligned ? 8 : 3;
    const StridedDevice qd = strided_copy(q, pad, 2 * pad, 5 * pad);
    const StridedDevice kd = strided_copy(k, pad, 0, 3 * pad);
    const StridedDevice vd = strided_copy(v, 2 * pad, pad, 0);
    EXPECT_EQ(kc::flash_forward_uses_tensor_cores(qd.view, kd.view, vd.view), aligned);
    Tensor out = poisoned({B, Sq, Hq, D}, dt, gpu());
    Tensor lse_store = poisoned({B, Sq, Hq}, DType::kFloat32, gpu());
    const int64_t lshape[3] = {B, Hq, Sq}, lstr[3] = {Sq * Hq, 1, Hq};
    TensorView lse(lse_store.data(), DType::kFloat32, gpu(), lshape, lstr);
    ops::AttentionOptions o;
    o.causal = true;
    o.q_offset = Sk - Sq;
    kc::flash_forward(qd.view, kd.view, vd.view, out, lse, o);
    const auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
    expect_close(out, ref.out, tolerance(dt), "out");
    expect_close(lse, ref.lse, 1e-5, "lse");
  }
}

// Backward: gradients of the fp64 reference, from the CUDA forward's out/lse.
void check_backward(const FwdCase& c, DType dt, bool accumulate, Path path = Path::kDefault) {
  SCOPED_TRACE(std::string(c.name) + " " + dtype_name(dt) + (accumulate ? " accumulate" : "") +
               (path == Path::kSimt ? " simt" : ""));
  const uint64_t seed = 2000 + static_cast<uint64_t>(c.Sq);
  const DeviceInputs in = make_inputs(c, dt, seed);
  Tensor dout_h = make_input({c.B, c.Sq, c.Hq, c.Dv}, dt, seed, 3);
  Tensor dout = to_device(dout_h.view(), gpu());
  const ops::AttentionOptions o = options_of(c);
  Tensor out = poisoned({c.B, c.Sq, c.Hq, c.Dv}, dt, gpu());
  Tensor lse = poisoned({c.B, c.Hq, c.Sq}, DType::kFloat32, gpu());
  kc::flash_forward(in.dq, in.dk, in.dv, out, lse, o);
  // accumulate: gradients land on top of known values; otherwise on NaN poison.
  Tensor g0q = make_input({c.B, c.Sq, c.Hq, c.D}, DType::kFloat32, seed, 4);
  Tensor g0k = make_input({c.B, c.Sk, c.Hkv, c.D}, DType::kFloat32, seed, 5);
  Tensor g0v = make_input({c.B, c.Sk, c.Hkv, c.Dv}, DType::kFloat32, seed, 6);
  Tensor dq = accumulate ? to_device(g0q.view(), gpu())
                         : poisoned({c.B, c.Sq, c.Hq, c.D}, DType::kFloat32, gpu());
  Tensor dk = accumulate ? to_device(g0k.view(), gpu())
                         : poisoned({c.B, c.Sk, c.Hkv, c.D}, DType::kFloat32, gpu());
  Tensor dv = accumulate ? to_device(g0v.view(), gpu())
                         : poisoned({c.B, c.Sk, c.Hkv, c.Dv}, DType::kFloat32, gpu());
  ops::BackwardOptions bo;
  bo.accumulate = accumulate;
  if (path == Path::kSimt)
    kc::flash_backward_simt(in.dq, in.dk, in.dv, out, dout, lse, dq, dk, dv, o, bo);
  else
    kc::flash_backward(in.dq, in.dk, in.dv, out, dout, lse, dq, dk, dv, o, bo);
  auto ref = kernels::cpu::reference_attention_backward(in.q, in.k, in.v, dout_h, o);
  if (accumulate) {
    for (auto [r, g] :
         {std::pair{&ref.dq, &g0q}, std::pair{&ref.dk, &g0k}, std::pair{&ref.dv, &g0v}})
      for (int64_t i = 0; i < r->numel(); ++i) r->data_as<double>()[i] += g->data_as<float>()[i];
  }
  const double floor = compare(std::vector<double>(ref.dv.numel(), 0.0), as_vector(ref.dv)).max_ref;
  // fp32 gradients sum Sk (or Sq) products and see out's rounding through delta: 2x the
  // forward bound; 16-bit inputs: the storage rounding of out dominates.
  const double tol = dt == DType::kFloat32 ? 2e-5 : tolerance(dt);
  expect_close(dq, ref.dq, tol, "dq", floor);
  expect_close(dk, ref.dk, tol, "dk", floor);
  expect_close(dv, ref.dv, tol, "dv");
}

TEST_F(CudaAttention, BackwardMatchesReference) {
  for (const FwdCase& c : kFwdCases) {
    if (c.D > 128) continue;  // keep the fp64 reference cheap
    for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
      check_backward(c, dt, false);
  }
}

TEST_F(CudaAttention, CudaCoreBackwardMatchesReference) {
  for (const FwdCase& c : kFwdCases) {
    if (c.D > 128) continue;
    check_backward(c, DType::kBFloat16, false, Path::kSimt);
  }
}

TEST_F(CudaAttention, TensorCoreBackwardTakesAlignedHeadDims64And128) {
  for (auto [d, dv, expect] : {std::tuple{64, 64, true}, std::tuple{128, 128, true},
                               std::tuple{192, 128, false}, std::tuple{96, 96, false}}) {
    const FwdCase c{"probe", 1, 8, 8, 2, 1, d, dv, false, 0, 0, -1, -1};
    const DeviceInputs in = make_inputs(c, DType::kFloat16, 9);
    Tensor dout = poisoned({1, 8, 2, dv}, DType::kFloat16, gpu());
    Tensor dout32 = poisoned({1, 8, 2, dv}, DType::kFloat32, gpu());
    // DISTATTN_CUDA_BACKWARD=simt turns the tensor-core backward off everywhere.
    const char* env = std::getenv("DISTATTN_CUDA_BACKWARD");
    const bool forced_simt = env != nullptr && std::string(env) == "simt";
    EXPECT_EQ(kc::flash_backward_uses_tensor_cores(in.dq, in.dk, in.dv, dout),
              expect && !forced_simt)
        << d << "/" << dv;
    EXPECT_FALSE(kc::flash_backward_uses_tensor_cores(in.dq, in.dk, in.dv, dout32));
  }
}

TEST_F(CudaAttention, BackwardAccumulatesIntoGradients) {
  check_backward(kFwdCases[0], DType::kFloat32, true);
  check_backward(kFwdCases[6], DType::kFloat16, true);
}

TEST_F(CudaAttention, BackwardWrites16BitGradients) {
  const FwdCase& c = kFwdCases[2];
  const DType dt = DType::kBFloat16;
  const DeviceInputs in = make_inputs(c, dt, 31);
  Tensor dout_h = make_input({c.B, c.Sq, c.Hq, c.Dv}, dt, 31, 3);
  Tensor dout = to_device(dout_h.view(), gpu());
  const ops::AttentionOptions o = options_of(c);
  Tensor out = poisoned({c.B, c.Sq, c.Hq, c.Dv}, DType::kFloat32, gpu());
  Tensor lse = poisoned({c.B, c.Hq, c.Sq}, DType::kFloat32, gpu());
  kc::flash_forward(in.dq, in.dk, in.dv, out, lse, o);
  Tensor dq = poisoned({c.B, c.Sq, c.Hq, c.D}, dt, gpu());
  Tensor dk = poisoned({c.B, c.Sk, c.Hkv, c.D}, dt, gpu());
  Tensor dv = poisoned({c.B, c.Sk, c.Hkv, c.Dv}, dt, gpu());
  kc::flash_backward(in.dq, in.dk, in.dv, out, dout, lse, dq, dk, dv, o, {});
  auto ref = kernels::cpu::reference_attention_backward(in.q, in.k, in.v, dout_h, o);
  const double floor = compare(std::vector<double>(ref.dv.numel(), 0.0), as_vector(ref.dv)).max_ref;
  expect_close(dq, ref.dq, tolerance(dt), "dq", floor);
  expect_close(dk, ref.dk, tolerance(dt), "dk", floor);
  expect_close(dv, ref.dv, tolerance(dt), "dv");
}

// Decode over a contiguous cache: every split count gives the reference.
TEST_F(CudaAttention, DecodeSplitKvMatchesReference) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16})
    for (int64_t sq : {1, 3})
      for (int splits : {0, 1, 3, 7}) {
        const FwdCase c{"decode", 2, sq, 301, 8, 2, 128, 128, true, 301 - sq, 0, -1, -1};
        SCOPED_TRACE(std::string(dtype_name(dt)) + " sq " + std::to_string(sq) + " splits " +
                     std::to_string(splits));
        const DeviceInputs in = make_inputs(c, dt, 50 + static_cast<uint64_t>(sq));
        Tensor out = poisoned({c.B, c.Sq, c.Hq, c.Dv}, DType::kFloat32, gpu());
        Tensor lse = poisoned({c.B, c.Hq, c.Sq}, DType::kFloat32, gpu());
        ops::DecodeOptions d;
        d.num_splits = splits;
        const ops::AttentionOptions o = options_of(c);
        kc::decode(in.dq, in.dk, in.dv, out, lse, o, d);
        const auto ref = kernels::cpu::reference_attention_forward(in.q, in.k, in.v, o);
        expect_close(out, ref.out, 1e-5, "out");  // fp32 out: accumulation error only
        expect_close(lse, ref.lse, 1e-5, "lse");
      }
}

// Long context with the automatic split count (16 splits on a 132-SM H100: 2 blocks
// otherwise) and a forced 64-way split; GQA rows of a block (4 or 12) spread over its
// warps. (Far more splits of a few keys each would fold partials ~sqrt(Sk / split) larger
// than the result, outgrowing the fp32 tolerance.)
TEST_F(CudaAttention, DecodeAutoSplitsOverALongContext) {
  for (int64_t sq : {1, 3})
    for (int splits : {0, 64}) {
      const int64_t sk = 4099;
      const FwdCase c{"decode_long", 1, sq, sk, 8, 2, 128, 128, true, sk - sq, 0, -1, -1};
      SCOPED_TRACE("sq " + std::to_string(sq) + " splits " + std::to_string(splits));
      const DeviceInputs in = make_inputs(c, DType::kBFloat16, 70 + static_cast<uint64_t>(sq));
      Tensor out = poisoned({c.B, c.Sq, c.Hq, c.Dv}, DType::kFloat32, gpu());
      Tensor lse = poisoned({c.B, c.Hq, c.Sq}, DType::kFloat32, gpu());
      ops::DecodeOptions d;
      d.num_splits = splits;
      const ops::AttentionOptions o = options_of(c);
      kc::decode(in.dq, in.dk, in.dv, out, lse, o, d);
      const auto ref = kernels::cpu::reference_attention_forward(in.q, in.k, in.v, o);
      expect_close(out, ref.out, 1e-5, "out");
      expect_close(lse, ref.lse, 1e-5, "lse");
    }
}

// Paged decode: pages shuffled, sequence lengths 0, shorter than a page, and not a
// multiple of the page size; each sequence checked against the reference over its own
// contiguous keys.
TEST_F(CudaAttention, DecodePagedMatchesReferencePerSequence) {
  const int64_t Hq = 4, Hkv = 2, D = 64, Sq = 2;
  for (int64_t page : {16, 64})
    for (int splits : {0, 1, 4}) {
      SCOPED_TRACE("page " + std::to_string(page) + " splits " + std::to_string(splits));
      const std::vector<int32_t> lens = {0, 5, 130, 257};
      const int64_t B = static_cast<int64_t>(lens.size());
      const int64_t max_pages = (257 + page - 1) / page;
      const int64_t num_pages = B * max_pages + 3;
      const DType dt = DType::kBFloat16;
      Tensor kpool = make_input({num_pages, page, Hkv, D}, dt, 90, 1);
      Tensor vpool = make_input({num_pages, page, Hkv, D}, dt, 90, 2);
      Tensor q = make_input({B, Sq, Hq, D}, dt, 90, 0);
      Tensor pt = Tensor::zeros({B, max_pages}, DType::kInt32);
      Tensor sl = Tensor::empty({B}, DType::kInt32);
      std::vector<int32_t> ids(static_cast<size_t>(num_pages));
      std::iota(ids.begin(), ids.end(), 0);
      std::reverse(ids.begin(), ids.end());  // pages out of order
      for (int64_t b = 0; b < B; ++b) {
        sl.data_as<int32_t>()[b] = lens[static_cast<size_t>(b)];
        for (int64_t p = 0; p < max_pages; ++p)
          pt.data_as<int32_t>()[b * max_pages + p] = ids[static_cast<size_t>(b * max_pages + p)];
      }
      ops::PagedKV cache;
      Tensor kd = to_device(kpool.view(), gpu()), vd = to_device(vpool.view(), gpu());
      Tensor ptd = to_device(pt.view(), gpu()), sld = to_device(sl.view(), gpu());
      cache.k_pages = kd.view();
      cache.v_pages = vd.view();
      cache.page_table = ptd.view();
      cache.seq_lens = sld.view();
      Tensor qd = to_device(q.view(), gpu());
      Tensor out = poisoned({B, Sq, Hq, D}, DType::kFloat32, gpu());
      Tensor lse = poisoned({B, Hq, Sq}, DType::kFloat32, gpu());
      ops::AttentionOptions o;
      o.causal = true;
      ops::DecodeOptions d;
      d.num_splits = splits;
      kc::decode_paged(qd, cache, out, lse, o, d, 257);
      const std::vector<double> got_out = to_double_vector(out), got_lse = to_double_vector(lse);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t len = lens[static_cast<size_t>(b)];
        if (len == 0) {  // no keys: out 0, lse -inf
          for (int64_t i = 0; i < Hq * Sq; ++i)
            EXPECT_EQ(got_lse[static_cast<size_t>(b * Hq * Sq + i)],
                      -std::numeric_limits<double>::infinity());
          for (int64_t i = 0; i < Sq * Hq * D; ++i)
            EXPECT_EQ(got_out[static_cast<size_t>(b * Sq * Hq * D + i)], 0.0);
          continue;
        }
        Tensor kc_ = Tensor::empty({1, len, Hkv, D}, dt), vc = Tensor::empty({1, len, Hkv, D}, dt);
        const size_t row = static_cast<size_t>(Hkv * D) * dtype_size(dt);
        for (int64_t t = 0; t < len; ++t) {
          const int64_t pg = pt.data_as<int32_t>()[b * max_pages + t / page];
          const size_t src = static_cast<size_t>(pg * page + t % page) * row;
          std::memcpy(static_cast<char*>(kc_.data()) + t * row,
                      static_cast<char*>(kpool.data()) + src, row);
          std::memcpy(static_cast<char*>(vc.data()) + t * row,
                      static_cast<char*>(vpool.data()) + src, row);
        }
        Tensor qb = Tensor::empty({1, Sq, Hq, D}, dt);
        std::memcpy(qb.data(), static_cast<char*>(q.data()) + b * Sq * Hq * D * dtype_size(dt),
                    qb.nbytes());
        ops::AttentionOptions ob = o;
        ob.q_offset = len - Sq;
        const auto ref = kernels::cpu::reference_attention_forward(qb, kc_, vc, ob);
        std::vector<double> go(got_out.begin() + b * Sq * Hq * D,
                               got_out.begin() + (b + 1) * Sq * Hq * D);
        std::vector<double> gl(got_lse.begin() + b * Hq * Sq, got_lse.begin() + (b + 1) * Hq * Sq);
        const ErrorStats so = compare(go, as_vector(ref.out));
        const ErrorStats sl_ = compare(gl, as_vector(ref.lse));
        EXPECT_EQ(so.non_finite, 0) << "seq " << b;
        EXPECT_EQ(sl_.non_finite, 0) << "seq " << b;
        EXPECT_LE(so.max_abs_err, 1e-5 * std::max(so.max_ref, 1e-30)) << "seq " << b;
        EXPECT_LE(sl_.max_abs_err, 1e-5 * std::max(sl_.max_ref, 1e-30)) << "seq " << b;
      }
    }
}

// Merge: NaN-safe, in place, against a host fp64 merge.
TEST_F(CudaAttention, MergeIsNanSafeAndWorksInPlace) {
  const int64_t B = 2, S = 9, H = 3, Dv = 37;
  Tensor oa = make_input({B, S, H, Dv}, DType::kFloat32, 5, 0);
  Tensor ob = make_input({B, S, H, Dv}, DType::kFloat32, 5, 1);
  Tensor la = make_input({B, H, S}, DType::kFloat32, 5, 2, 8.0);
  Tensor lb = make_input({B, H, S}, DType::kFloat32, 5, 3, 8.0);
  const float ninf = -std::numeric_limits<float>::infinity();
  // Row pattern: (a -inf), (b -inf), (both -inf).
  for (int64_t i = 0; i < la.numel(); i += 3) la.data_as<float>()[i] = ninf;
  for (int64_t i = 1; i < lb.numel(); i += 3) lb.data_as<float>()[i] = ninf;
  for (int64_t i = 2; i < la.numel(); i += 7)
    la.data_as<float>()[i] = lb.data_as<float>()[i] = ninf;
  std::vector<double> ref_o(static_cast<size_t>(oa.numel())),
      ref_l(static_cast<size_t>(la.numel()));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t li = (b * H + h) * S + s;
        const double a = la.data_as<float>()[li], c = lb.data_as<float>()[li];
        const double mx = std::max(a, c);
        double lse = -INFINITY, wa = 0, wb = 0;
        if (mx != -INFINITY) {
          lse = mx + std::log(std::exp(a - mx) + std::exp(c - mx));
          wa = std::exp(a - lse);
          wb = std::exp(c - lse);
        }
        ref_l[static_cast<size_t>(li)] = lse;
        for (int64_t d = 0; d < Dv; ++d) {
          const int64_t oi = ((b * S + s) * H + h) * Dv + d;
          ref_o[static_cast<size_t>(oi)] =
              wa * oa.data_as<float>()[oi] + wb * ob.data_as<float>()[oi];
        }
      }
  for (bool in_place : {false, true}) {
    Tensor oad = to_device(oa.view(), gpu()), obd = to_device(ob.view(), gpu());
    Tensor lad = to_device(la.view(), gpu()), lbd = to_device(lb.view(), gpu());
    Tensor od = poisoned({B, S, H, Dv}, DType::kFloat32, gpu());
    Tensor ld = poisoned({B, H, S}, DType::kFloat32, gpu());
    const TensorView& o = in_place ? oad.view() : od.view();
    const TensorView& l = in_place ? lad.view() : ld.view();
    kc::merge(oad, lad, obd, lbd, o, l, nullptr);
    const ErrorStats so = compare(to_double_vector(o), ref_o);
    const ErrorStats sl = compare(to_double_vector(l), ref_l);
    EXPECT_EQ(so.non_finite, 0) << "in_place " << in_place;
    EXPECT_EQ(sl.non_finite, 0) << "in_place " << in_place;
    EXPECT_LE(so.max_abs_err, 1e-6 * so.max_ref) << "in_place " << in_place;
    EXPECT_LE(sl.max_abs_err, 1e-6 * sl.max_ref) << "in_place " << in_place;
  }
}

// Through the public ops (validation + device dispatch) with CUDA tensors.
TEST_F(CudaAttention, OpsDispatchCudaTensorsToTheGpuKernels) {
  const FwdCase& c = kFwdCases[1];
  const DeviceInputs in = make_inputs(c, DType::kBFloat16, 61);
  Tensor out = poisoned({c.B, c.Sq, c.Hq, c.Dv}, DType::kBFloat16, gpu());
  Tensor lse = poisoned({c.B, c.Hq, c.Sq}, DType::kFloat32, gpu());
  const ops::AttentionOptions o = options_of(c);
  ops::attention_forward(in.dq, in.dk, in.dv, out, lse, o);
  const auto ref = kernels::cpu::reference_attention_forward(in.q, in.k, in.v, o);
  expect_close(out, ref.out, tolerance(DType::kBFloat16), "out");
  expect_close(lse, ref.lse, 1e-5, "lse");

  // No keys: out 0, lse -inf.
  Tensor k0 = Tensor::empty({c.B, 0, c.Hkv, c.D}, DType::kBFloat16, gpu());
  Tensor v0 = Tensor::empty({c.B, 0, c.Hkv, c.Dv}, DType::kBFloat16, gpu());
  ops::attention_forward(in.dq, k0, v0, out, lse, o);
  for (double x : to_double_vector(out)) ASSERT_EQ(x, 0.0);
  for (double x : to_double_vector(lse)) ASSERT_EQ(x, -std::numeric_limits<double>::infinity());

  // Mixed devices are refused before any kernel runs.
  Tensor k_host = make_input({c.B, c.Sk, c.Hkv, c.D}, DType::kBFloat16, 61, 1);
  EXPECT_THROW(ops::attention_forward(in.dq, k_host, in.dv, out, lse, o), Error);
}

TEST_F(CudaAttention, OpsPagedDecodeValidatesDevicePageTables) {
  const int64_t B = 1, Sq = 1, H = 2, D = 64, page = 16, pages = 4;
  Tensor kp = to_device(make_input({pages, page, H, D}, DType::kBFloat16, 3, 1).view(), gpu());
  Tensor vp = to_device(make_input({pages, page, H, D}, DType::kBFloat16, 3, 2).view(), gpu());
  Tensor q = to_device(make_input({B, Sq, H, D}, DType::kBFloat16, 3, 0).view(), gpu());
  Tensor pt_h = Tensor::empty({B, 2}, DType::kInt32);
  pt_h.data_as<int32_t>()[0] = 3;
  pt_h.data_as<int32_t>()[1] = 7;  // not a page id
  Tensor sl_h = Tensor::empty({B}, DType::kInt32);
  sl_h.data_as<int32_t>()[0] = 20;
  Tensor pt = to_device(pt_h.view(), gpu()), sl = to_device(sl_h.view(), gpu());
  ops::PagedKV cache{kp.view(), vp.view(), pt.view(), sl.view()};
  Tensor out = poisoned({B, Sq, H, D}, DType::kFloat32, gpu());
  Tensor lse = poisoned({B, H, Sq}, DType::kFloat32, gpu());
  try {
    ops::attention_decode_paged(q, cache, out, lse);
    ADD_FAILURE() << "a page id outside the pool was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::kInvalidArgument);
    EXPECT_NE(e.message().find("page_table[0, 1] = 7"), std::string::npos) << e.message();
  }
}

// More (batch, head) pairs than gridDim.y takes (65535): every kernel spreads them over
// grid y and z. Distinct inputs per head, so a block computing the wrong (b, h) fails.
TEST_F(CudaAttention, ManyBatchHeadsBeyondTheGridYLimit) {
  // 65600 pairs: two z slices, the second mostly idle (GQA: 131200 query-head pairs in the
  // tensor-core forward and dQ, three slices). Each path once: tensor-core and CUDA-core
  // forward and backward.
  const int64_t B = 2, H = 32800;
  const FwdCase mha{"pairs_mha", B, 2, 3, H, H, 64, 64, true, 1, 0, -1, -1};
  const FwdCase gqa{"pairs_gqa", B, 2, 3, 2 * H, H, 64, 64, false, 0, 0, -1, -1};
  for (const FwdCase* c : {&mha, &gqa}) {
    check_forward(*c, DType::kBFloat16, DType::kBFloat16, Path::kDefault);
    check_forward(*c, DType::kBFloat16, DType::kBFloat16, Path::kSimt);
    check_backward(*c, DType::kBFloat16, false);
  }
  check_backward(mha, DType::kBFloat16, false, Path::kSimt);
  // Split-KV decode: z also carries the splits.
  const FwdCase c{"pairs_decode", B, 1, 5, H, H, 64, 64, true, 4, 0, -1, -1};
  const DeviceInputs in = make_inputs(c, DType::kBFloat16, 88);
  const ops::AttentionOptions o = options_of(c);
  const auto ref = kernels::cpu::reference_attention_forward(in.q, in.k, in.v, o);
  for (int splits : {1, 3}) {
    SCOPED_TRACE("decode splits " + std::to_string(splits));
    Tensor out = poisoned({c.B, c.Sq, c.Hq, c.Dv}, DType::kFloat32, gpu());
    Tensor lse = poisoned({c.B, c.Hq, c.Sq}, DType::kFloat32, gpu());
    ops::DecodeOptions d;
    d.num_splits = splits;
    kc::decode(in.dq, in.dk, in.dv, out, lse, o, d);
    expect_close(out, ref.out, 1e-5, "out");
    expect_close(lse, ref.lse, 1e-5, "lse");
  }
}

// q, k, v as head slices of one fused [B, S, Hq + 2 Hkv, D] buffer, out and lse as slices
// of wider buffers, gradients as head slices of one fused dQKV buffer: every kernel must
// use the views' strides (a packed-stride assumption reads or writes the neighbours).
TEST_F(CudaAttention, FusedQkvViewsForwardAndBackward) {
  const int64_t B = 2, S = 75, Hq = 4, Hkv = 2, D = 128, Ht = Hq + 2 * Hkv;
  const DType dt = DType::kBFloat16;
  Tensor q = make_input({B, S, Hq, D}, dt, 91, 0);
  Tensor k = make_input({B, S, Hkv, D}, dt, 91, 1);
  Tensor v = make_input({B, S, Hkv, D}, dt, 91, 2);
  Tensor dout_h = make_input({B, S, Hq, D}, dt, 91, 3);
  Tensor qkv_h = Tensor::zeros({B, S, Ht, D}, dt);
  copy_into(q.view(), qkv_h.view().slice(2, 0, Hq));
  copy_into(k.view(), qkv_h.view().slice(2, Hq, Hkv));
  copy_into(v.view(), qkv_h.view().slice(2, Hq + Hkv, Hkv));
  Tensor qkv = to_device(qkv_h.view(), gpu());
  const TensorView qd = qkv.view().slice(2, 0, Hq), kd = qkv.view().slice(2, Hq, Hkv),
                   vd = qkv.view().slice(2, Hq + Hkv, Hkv);
  Tensor dout = to_device(dout_h.view(), gpu());
  ops::AttentionOptions o;
  o.causal = true;
  const auto ref = kernels::cpu::reference_attention_forward(q, k, v, o);
  const auto gref = kernels::cpu::reference_attention_backward(q, k, v, dout_h, o);
  const double floor =
      compare(std::vector<double>(gref.dv.numel(), 0.0), as_vector(gref.dv)).max_ref;
  for (Path path : {Path::kDefault, Path::kSimt}) {
    SCOPED_TRACE(path == Path::kSimt ? "simt" : "default");
    if (path == Path::kDefault) {
      EXPECT_TRUE(kc::flash_forward_uses_tensor_cores(qd, kd, vd));
      EXPECT_TRUE(kc::flash_backward_uses_tensor_cores(qd, kd, vd, dout));
    }
    // out: the second half of [B, S, Hq, 2D]; lse: the first Sq of [B, Hq, S + 3].
    Tensor out_store = poisoned({B, S, Hq, 2 * D}, dt, gpu());
    Tensor lse_store = poisoned({B, Hq, S + 3}, DType::kFloat32, gpu());
    const TensorView out = out_store.view().slice(3, D, D);
    const TensorView lse = lse_store.view().slice(2, 0, S);
    if (path == Path::kSimt)
      kc::flash_forward_simt(qd, kd, vd, out, lse, o);
    else
      kc::flash_forward(qd, kd, vd, out, lse, o);
    expect_close(out, ref.out, tolerance(dt), "out");
    expect_close(lse, ref.lse, 1e-5, "lse");
    for (double x : to_double_vector(out_store.view().slice(3, 0, D)))
      ASSERT_TRUE(std::isnan(x)) << "write outside the out view";
    for (double x : to_double_vector(lse_store.view().slice(2, S, 3)))
      ASSERT_TRUE(std::isnan(x)) << "write outside the lse view";

    Tensor dqkv = poisoned({B, S, Ht, D}, DType::kFloat32, gpu());
    const TensorView dq = dqkv.view().slice(2, 0, Hq), dk = dqkv.view().slice(2, Hq, Hkv),
                     dv = dqkv.view().slice(2, Hq + Hkv, Hkv);
    if (path == Path::kSimt)
      kc::flash_backward_simt(qd, kd, vd, out, dout, lse, dq, dk, dv, o, {});
    else
      kc::flash_backward(qd, kd, vd, out, dout, lse, dq, dk, dv, o, {});
    expect_close(dq, gref.dq, tolerance(dt), "dq", floor);
    expect_close(dk, gref.dk, tolerance(dt), "dk", floor);
    expect_close(dv, gref.dv, tolerance(dt), "dv");
  }
}

// merge launches on the tensors' device even when another device is current.
TEST_F(CudaAttention, MergeRunsOnTheTensorsDevice) {
  if (cuda_device_count() < 2) GTEST_SKIP() << "needs two GPUs";
  const int64_t B = 1, S = 3, H = 2, Dv = 8;
  Tensor oa = make_input({B, S, H, Dv}, DType::kFloat32, 6, 0);
  Tensor la = make_input({B, H, S}, DType::kFloat32, 6, 1);
  Tensor oad = to_device(oa.view(), gpu()), lad = to_device(la.view(), gpu());
  Tensor od = poisoned({B, S, H, Dv}, DType::kFloat32, gpu());
  Tensor ld = poisoned({B, H, S}, DType::kFloat32, gpu());
  int current = 0;
  ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
  ASSERT_EQ(cudaSetDevice(gpu().index), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  // Another device current: a launch into the tensors' stream from there is refused, so
  // merge must switch devices itself (and put the caller's device back).
  const int other = gpu().index == 0 ? 1 : 0;
  ASSERT_EQ(cudaSetDevice(other), cudaSuccess);
  std::string error;
  try {
    // Merging a partial with itself: weights 1/2 each, out = oa, lse = la + log 2.
    kc::merge(oad, lad, oad, lad, od, ld, static_cast<Stream>(stream));
  } catch (const Error& e) {
    error = e.message();
  }
  int after = -1;
  const cudaError_t got_device = cudaGetDevice(&after);
  ASSERT_EQ(cudaSetDevice(gpu().index), cudaSuccess);
  const cudaError_t synced = cudaStreamSynchronize(stream);
  (void)cudaStreamDestroy(stream);
  ASSERT_EQ(cudaSetDevice(current), cudaSuccess);
  EXPECT_EQ(error, "");
  EXPECT_EQ(synced, cudaSuccess);
  EXPECT_EQ(got_device, cudaSuccess);
  EXPECT_EQ(after, other) << "merge must leave the caller's device current";
  const std::vector<double> o = to_double_vector(od), l = to_double_vector(ld);
  const std::vector<double> oe = to_double_vector(oa), le = to_double_vector(la);
  for (size_t i = 0; i < o.size(); ++i) EXPECT_NEAR(o[i], oe[i], 1e-6 * std::abs(oe[i]) + 1e-7);
  for (size_t i = 0; i < l.size(); ++i) EXPECT_NEAR(l[i], le[i] + std::log(2.0), 1e-5);
}

#else
TEST(CudaAttention, SkippedWithoutCudaBuild) {
  GTEST_SKIP() << "skipped: built without CUDA";
}
#endif

}  // namespace
}  // namespace distattn::testing
