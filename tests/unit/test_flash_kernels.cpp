// The CPU flash kernels (kernels/cpu/flash_*) against a naive fp64 attention written here,
// on both the AVX-512 and the portable instruction-set paths.
#include <gtest/gtest.h>
#include <omp.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"
#include "kernels/cpu/amx_gemm.h"
#include "kernels/cpu/attention_cpu.h"
#include "kernels/cpu/flash_cpu.h"

namespace distattn {
namespace {

using kernels::cpu::CpuKernelIsa;
using testing::compare;
using testing::to_double_vector;

struct Case {
  int64_t B = 1, Sq = 7, Sk = 7, Hq = 2, Hkv = 2, D = 64, Dv = 64;
  DType dtype = DType::kFloat32;      // q, k, v (and dout)
  DType out_dtype = DType::kFloat32;  // out, dq, dk, dv
  bool causal = false;
  int64_t q_offset = 0, k_offset = 0, wl = -1, wr = -1;
  bool strided = false;  // pad seq/head strides and lse
  std::string str() const {
    std::ostringstream os;
    os << "B" << B << " Sq" << Sq << " Sk" << Sk << " Hq" << Hq << " Hkv" << Hkv << " D" << D
       << " Dv" << Dv << " " << dtype_name(dtype) << "->" << dtype_name(out_dtype)
       << (causal ? " causal" : "") << " qoff" << q_offset << " koff" << k_offset << " win(" << wl
       << "," << wr << ")" << (strided ? " strided" : "");
    return os.str();
  }
  ops::AttentionOptions opts() const {
    ops::AttentionOptions o;
    o.causal = causal;
    o.q_offset = q_offset;
    o.k_offset = k_offset;
    o.window_left = wl;
    o.window_right = wr;
    return o;
  }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(D)); }
  bool visible(int64_t i, int64_t j) const {
    const int64_t qp = q_offset + i, kp = k_offset + j;
    if (causal && kp > qp) return false;
    if (wl >= 0 && kp < qp - wl) return false;
    if (wr >= 0 && kp > qp + wr) return false;
    return true;
  }
};

// A BSHD tensor, packed or with padded seq/head strides (the padding holds garbage).
struct Buf {
  Tensor storage;
  TensorView view;
};
Buf make_bshd(int64_t B, int64_t S, int64_t H, int64_t D, DType t, bool strided) {
  Buf b;
  if (!strided) {
    b.storage = Tensor::empty({B, S, H, D}, t);
    b.view = b.storage.view();
    return b;
  }
  b.storage = Tensor::empty({B, S, H + 1, D + 5}, t);
  testing::fill_test_data(b.storage, 999, 77);  // garbage in the padding
  b.view = b.storage.view().slice(2, 0, H).slice(3, 0, D);
  return b;
}
// Fill a (possibly strided) view with test data: packed temp, then element copy.
void fill(const TensorView& v, uint64_t id) {
  Tensor packed = Tensor::empty(std::span<const int64_t>(v.shape.data(), v.ndim), v.dtype);
  testing::fill_test_data(packed, 1234, id);
  const size_t es = v.element_size();
  const char* src = static_cast<const char*>(packed.data());
  for (int64_t b = 0; b < v.size(0); ++b)
    for (int64_t s = 0; s < v.size(1); ++s)
      for (int64_t h = 0; h < v.size(2); ++h) {
        const int64_t di = ((b * v.size(1) + s) * v.size(2) + h) * v.size(3);
        char* dst =
            static_cast<char*>(v.data) +
            (b * v.stride(0) + s * v.stride(1) + h * v.stride(2)) * static_cast<int64_t>(es);
        std::memcpy(dst, src + di * static_cast<int64_t>(es), static_cast<size_t>(v.size(3)) * es);
      }
}

struct NaiveForward {
  std::vector<double> out, lse;
};
// q,k,v as packed fp64 BSHD.
NaiveForward naive_forward(const Case& c, const std::vector<double>& q,
                           const std::vector<double>& k, const std::vector<double>& v) {
  NaiveForward r;
  r.out.assign(static_cast<size_t>(c.B * c.Sq * c.Hq * c.Dv), 0.0);
  r.lse.assign(static_cast<size_t>(c.B * c.Hq * c.Sq), -std::numeric_limits<double>::infinity());
  const int64_t g = c.Hq / c.Hkv;
  std::vector<double> s(static_cast<size_t>(c.Sk));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Sq; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < c.Sk; ++j) {
          if (!c.visible(i, j)) continue;
          double acc = 0;
          for (int64_t d = 0; d < c.D; ++d)
            acc += q[((b * c.Sq + i) * c.Hq + h) * c.D + d] *
                   k[((b * c.Sk + j) * c.Hkv + h / g) * c.D + d];
          s[j] = acc * c.scale();
          mx = std::max(mx, s[j]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;
        double sum = 0;
        double* o = &r.out[((b * c.Sq + i) * c.Hq + h) * c.Dv];
        for (int64_t j = 0; j < c.Sk; ++j) {
          if (!c.visible(i, j)) continue;
          const double p = std::exp(s[j] - mx);
          sum += p;
          for (int64_t d = 0; d < c.Dv; ++d)
            o[d] += p * v[((b * c.Sk + j) * c.Hkv + h / g) * c.Dv + d];
        }
        for (int64_t d = 0; d < c.Dv; ++d) o[d] /= sum;
        r.lse[(b * c.Hq + h) * c.Sq + i] = mx + std::log(sum);
      }
  return r;
}

struct NaiveBackward {
  std::vector<double> dq, dk, dv;
};
NaiveBackward naive_backward(const Case& c, const std::vector<double>& q,
                             const std::vector<double>& k, const std::vector<double>& v,
                             const std::vector<double>& dout) {
  const NaiveForward f = naive_forward(c, q, k, v);
  NaiveBackward r;
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(v.size(), 0.0);
  const int64_t g = c.Hq / c.Hkv;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Sq; ++i) {
        const double lse = f.lse[(b * c.Hq + h) * c.Sq + i];
        if (std::isinf(lse)) continue;
        const double* qi = &q[((b * c.Sq + i) * c.Hq + h) * c.D];
        const double* doi = &dout[((b * c.Sq + i) * c.Hq + h) * c.Dv];
        const double* oi = &f.out[((b * c.Sq + i) * c.Hq + h) * c.Dv];
        double delta = 0;
        for (int64_t d = 0; d < c.Dv; ++d) delta += doi[d] * oi[d];
        for (int64_t j = 0; j < c.Sk; ++j) {
          if (!c.visible(i, j)) continue;
          const int64_t kvrow = (b * c.Sk + j) * c.Hkv + h / g;
          const double* kj = &k[kvrow * c.D];
          const double* vj = &v[kvrow * c.Dv];
          double s = 0, dp = 0;
          for (int64_t d = 0; d < c.D; ++d) s += qi[d] * kj[d];
          for (int64_t d = 0; d < c.Dv; ++d) dp += doi[d] * vj[d];
          const double p = std::exp(s * c.scale() - lse);
          const double ds = p * (dp - delta) * c.scale();
          for (int64_t d = 0; d < c.Dv; ++d) r.dv[kvrow * c.Dv + d] += p * doi[d];
          for (int64_t d = 0; d < c.D; ++d) {
            r.dq[((b * c.Sq + i) * c.Hq + h) * c.D + d] += ds * kj[d];
            r.dk[kvrow * c.D + d] += ds * qi[d];
          }
        }
      }
  return r;
}

// Relative tolerance (max error / max |ref|) for results stored in `t` computed from inputs
// stored in `in`: fp32 accumulation everywhere, so only the result's rounding matters.
double tol(DType t) {
  switch (t) {
    case DType::kBFloat16:
      return 2e-2;
    case DType::kFloat16:
      return 2e-3;
    default:
      return 1e-5;
  }
}

std::vector<CpuKernelIsa> isas() {
  std::vector<CpuKernelIsa> r{CpuKernelIsa::kPortable};
  if (kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx2)) r.push_back(CpuKernelIsa::kAvx2);
  if (kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512))
    r.push_back(CpuKernelIsa::kAvx512);
  if (kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16))
    r.push_back(CpuKernelIsa::kAvx512Bf16);
  if (kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAmx)) r.push_back(CpuKernelIsa::kAmx);
  return r;
}

struct IsaGuard {
  explicit IsaGuard(CpuKernelIsa isa) { kernels::cpu::set_cpu_kernel_isa(isa); }
  ~IsaGuard() { kernels::cpu::set_cpu_kernel_isa(CpuKernelIsa::kAuto); }
};

struct Inputs {
  Buf q, k, v;
  std::vector<double> qd, kd, vd;
};
Inputs make_inputs(const Case& c) {
  Inputs in;
  in.q = make_bshd(c.B, c.Sq, c.Hq, c.D, c.dtype, c.strided);
  in.k = make_bshd(c.B, c.Sk, c.Hkv, c.D, c.dtype, c.strided);
  in.v = make_bshd(c.B, c.Sk, c.Hkv, c.Dv, c.dtype, c.strided);
  fill(in.q.view, 1);
  fill(in.k.view, 2);
  fill(in.v.view, 3);
  in.qd = to_double_vector(in.q.view);
  in.kd = to_double_vector(in.k.view);
  in.vd = to_double_vector(in.v.view);
  return in;
}

struct ForwardResult {
  Buf out;
  Tensor lse_storage;
  TensorView lse;
};
ForwardResult run_forward(const Case& c, const Inputs& in, const ops::AttentionOptions& o) {
  ForwardResult r;
  r.out = make_bshd(c.B, c.Sq, c.Hq, c.Dv, c.out_dtype, c.strided);
  if (c.strided) {
    r.lse_storage = Tensor::empty({c.B, c.Hq, c.Sq + 3}, DType::kFloat32);
    r.lse = r.lse_storage.view().slice(2, 0, c.Sq);
  } else {
    r.lse_storage = Tensor::empty({c.B, c.Hq, c.Sq}, DType::kFloat32);
    r.lse = r.lse_storage.view();
  }
  kernels::cpu::flash_forward(in.q.view, in.k.view, in.v.view, r.out.view, r.lse, o);
  return r;
}

void check_forward(const Case& c) {
  const Inputs in = make_inputs(c);
  const NaiveForward ref = naive_forward(c, in.qd, in.kd, in.vd);
  for (CpuKernelIsa isa : isas()) {
    SCOPED_TRACE(c.str() + " isa=" + kernels::cpu::cpu_kernel_isa_name(isa));
    IsaGuard guard(isa);
    const ForwardResult r = run_forward(c, in, c.opts());
    const auto eo = compare(to_double_vector(r.out.view), ref.out);
    EXPECT_EQ(eo.non_finite, 0);
    EXPECT_LE(eo.rel(), tol(c.out_dtype)) << "out max abs err " << eo.max_abs_err;
    const auto el = compare(to_double_vector(r.lse), ref.lse);
    EXPECT_EQ(el.non_finite, 0) << "lse must be finite or -inf exactly where the reference is";
    EXPECT_LE(el.max_abs_err, 1e-5 * std::max(1.0, el.max_ref));
  }
}

void check_backward(const Case& c, bool accumulate = false) {
  const Inputs in = make_inputs(c);
  Buf dout = make_bshd(c.B, c.Sq, c.Hq, c.Dv, c.dtype, c.strided);
  fill(dout.view, 4);
  const NaiveBackward ref = naive_backward(c, in.qd, in.kd, in.vd, to_double_vector(dout.view));
  for (CpuKernelIsa isa : isas()) {
    SCOPED_TRACE(c.str() + " isa=" + kernels::cpu::cpu_kernel_isa_name(isa) +
                 (accumulate ? " accumulate" : ""));
    IsaGuard guard(isa);
    const ForwardResult f = run_forward(c, in, c.opts());
    Buf dq = make_bshd(c.B, c.Sq, c.Hq, c.D, c.out_dtype, c.strided);
    Buf dk = make_bshd(c.B, c.Sk, c.Hkv, c.D, c.out_dtype, c.strided);
    Buf dv = make_bshd(c.B, c.Sk, c.Hkv, c.Dv, c.out_dtype, c.strided);
    // Overwrite mode must not read what is there; accumulate mode must add to it.
    fill(dq.view, 11);
    fill(dk.view, 12);
    fill(dv.view, 13);
    std::vector<double> rq = ref.dq, rk = ref.dk, rv = ref.dv;
    if (accumulate) {
      const auto q0 = to_double_vector(dq.view), k0 = to_double_vector(dk.view),
                 v0 = to_double_vector(dv.view);
      for (size_t x = 0; x < rq.size(); ++x) rq[x] += q0[x];
      for (size_t x = 0; x < rk.size(); ++x) rk[x] += k0[x];
      for (size_t x = 0; x < rv.size(); ++x) rv[x] += v0[x];
    }
    ops::BackwardOptions bo;
    bo.accumulate = accumulate;
    kernels::cpu::flash_backward(in.q.view, in.k.view, in.v.view, f.out.view, dout.view, f.lse,
                                 dq.view, dk.view, dv.view, c.opts(), bo);
    // Backward reads the stored out (delta = rowsum(dout*out)), so the out dtype's rounding
    // also enters the gradients.
    const double t = tol(c.out_dtype);
    const auto eq = compare(to_double_vector(dq.view), rq);
    const auto ek = compare(to_double_vector(dk.view), rk);
    const auto ev = compare(to_double_vector(dv.view), rv);
    EXPECT_EQ(eq.non_finite + ek.non_finite + ev.non_finite, 0);
    EXPECT_LE(eq.rel(), t) << "dq max abs err " << eq.max_abs_err << " ref " << eq.max_ref;
    EXPECT_LE(ek.rel(), t) << "dk max abs err " << ek.max_abs_err << " ref " << ek.max_ref;
    EXPECT_LE(ev.rel(), t) << "dv max abs err " << ev.max_abs_err << " ref " << ev.max_ref;
  }
}

// The forward of one case under two instruction sets: out within out_tol (relative to its
// largest value) and lse within 1e-5.
void expect_isas_agree(const Case& c, CpuKernelIsa a, CpuKernelIsa b, double out_tol) {
  const Inputs in = make_inputs(c);
  std::vector<double> outs[2], lses[2];
  for (int x = 0; x < 2; ++x) {
    IsaGuard guard(x == 0 ? a : b);
    const ForwardResult r = run_forward(c, in, c.opts());
    outs[x] = to_double_vector(r.out.view);
    lses[x] = to_double_vector(r.lse);
  }
  const auto e = compare(outs[1], outs[0]);
  EXPECT_EQ(e.non_finite, 0);
  EXPECT_LE(e.rel(), out_tol);
  EXPECT_GT(e.max_ref, 0.0);
  const auto el = compare(lses[1], lses[0]);
  EXPECT_LE(el.max_abs_err, 1e-5 * std::max(1.0, el.max_ref));
}

// Mask variants at one size: none, causal, causal with offsets, windows.
std::vector<Case> mask_variants(Case base) {
  std::vector<Case> r;
  r.push_back(base);
  Case c = base;
  c.causal = true;
  r.push_back(c);
  c.q_offset = base.Sk > 3 ? base.Sk - base.Sq + 2 : 0;  // queries at the end of the keys
  r.push_back(c);
  c = base;
  c.wl = 5;
  c.wr = 0;
  c.causal = true;
  r.push_back(c);  // sliding window
  c = base;
  c.wl = 40;
  c.wr = 9;
  c.q_offset = 3;
  c.k_offset = 1;
  r.push_back(c);  // two-sided window with offsets
  return r;
}

TEST(FlashForward, MatchesNaiveAcrossSizesAndMasksFp32) {
  for (int64_t s : {1, 7, 131, 257}) {
    Case base;
    base.Sq = s;
    base.Sk = s;
    for (const Case& c : mask_variants(base)) check_forward(c);
  }
  Case c;  // Sq != Sk, batch 2, GQA
  c.B = 2;
  c.Sq = 70;
  c.Sk = 131;
  c.Hq = 4;
  c.Hkv = 1;
  for (const Case& v : mask_variants(c)) check_forward(v);
}

TEST(FlashForward, Bf16AndFp16InputsWithNativeAndFp32Outputs) {
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    for (DType o : {t, DType::kFloat32}) {
      Case c;
      c.Sq = 131;
      c.Sk = 257;
      c.Hq = 4;
      c.Hkv = 2;
      c.dtype = t;
      c.out_dtype = o;
      c.causal = true;
      c.q_offset = 126;
      check_forward(c);
    }
  }
}

// Cases for the bf16 dot-product tiles (AVX512-BF16): bf16 inputs of each shape {Sq, Sk, D,
// Dv}, 4/2 heads, bf16 and fp32 results, under every mask variant.
std::vector<Case> bf16_tile_cases(const std::vector<std::array<int64_t, 4>>& shapes) {
  std::vector<Case> r;
  for (const auto& [sq, sk, d, dv] : shapes)
    for (DType o : {DType::kBFloat16, DType::kFloat32}) {
      Case base;
      base.Sq = sq;
      base.Sk = sk;
      base.D = d;
      base.Dv = dv;
      base.Hq = 4;
      base.Hkv = 2;
      base.dtype = DType::kBFloat16;
      base.out_dtype = o;
      for (const Case& c : mask_variants(base)) r.push_back(c);
    }
  return r;
}

// The forward's bf16 tiles: every tail the packing has (odd key tiles, query blocks and Dv
// not multiples of 16, one query, one key), masks, GQA, strided operands, and an odd head dim
// (which takes the fp32 tiles of the same policy).
TEST(FlashForward, Bf16DotProductTilesAcrossTailsAndMasks) {
  if (!kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16))
    GTEST_SKIP() << "no AVX512-BF16 on this CPU/build: the bf16 tiles are not tested here";
  for (Case c : bf16_tile_cases({// Sq, Sk, D, Dv
                                 {1, 1, 64, 64},
                                 {7, 131, 128, 128},
                                 {131, 257, 64, 64},
                                 {37, 129, 80, 72},
                                 {70, 300, 576, 512},
                                 {5, 17, 7, 3}})) {
    check_forward(c);
    c.strided = true;
    check_forward(c);
  }
}

TEST(FlashKernels, Avx512Bf16AgreesWithAvx512OnBf16Inputs) {
  if (!kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16))
    GTEST_SKIP() << "no AVX512-BF16 on this CPU/build";
  // Same products (bf16 x bf16 is exact in fp32); they differ by fp32 summation order, and
  // an fp32 out carries P as bf16 hi + lo, so they agree to fp32 accuracy.
  Case c;
  c.Sq = 257;
  c.Sk = 257;
  c.D = 128;
  c.Dv = 128;
  c.causal = true;
  c.dtype = DType::kBFloat16;
  c.out_dtype = DType::kFloat32;
  expect_isas_agree(c, CpuKernelIsa::kAvx512, CpuKernelIsa::kAvx512Bf16, 1e-5);
}

TEST(FlashForward, HeadDimsIncludingOddAndMlaSized) {
  const std::vector<std::pair<int64_t, int64_t>> dims{
      {128, 128}, {80, 80}, {192, 128}, {576, 512}, {7, 3}};
  for (auto [d, dv] : dims) {
    Case c;
    c.Sq = 37;
    c.Sk = 131;
    c.D = d;
    c.Dv = dv;
    c.Hq = 2;
    c.Hkv = 1;
    check_forward(c);
    c.causal = true;
    c.q_offset = 94;
    c.strided = true;
    check_forward(c);
  }
}

TEST(FlashForward, StridedOperandsAndLse) {
  Case c;
  c.B = 2;
  c.Sq = 131;
  c.Sk = 131;
  c.strided = true;
  for (const Case& v : mask_variants(c)) check_forward(v);
}

TEST(FlashForward, FewHeadsSplitQueriesIntoSmallerBlocksForMoreThreads) {
  // One head and 8 threads: the forward halves its query block (128 -> 32) to make items.
  const int saved = omp_get_max_threads();
  omp_set_num_threads(8);
  Case c;
  c.Hq = 1;
  c.Hkv = 1;
  c.Sq = 120;
  c.Sk = 257;
  check_forward(c);
  c.causal = true;
  c.q_offset = 137;
  check_forward(c);
  omp_set_num_threads(saved);
}

TEST(FlashForward, FullyMaskedRowsGiveZeroOutAndNegInfLse) {
  Case c;
  c.Sq = 20;
  c.Sk = 9;
  c.causal = true;
  c.q_offset = 0;
  c.k_offset = 10;  // queries 0..9 see nothing, 10..19 see some keys
  for (CpuKernelIsa isa : isas()) {
    SCOPED_TRACE(kernels::cpu::cpu_kernel_isa_name(isa));
    IsaGuard guard(isa);
    const Inputs in = make_inputs(c);
    const ForwardResult r = run_forward(c, in, c.opts());
    const auto out = to_double_vector(r.out.view);
    const auto lse = to_double_vector(r.lse);
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Sq; ++i) {
        const double l = lse[h * c.Sq + i];
        if (i < 10) {
          EXPECT_TRUE(std::isinf(l) && l < 0) << "row " << i << " lse " << l;
          for (int64_t d = 0; d < c.Dv; ++d) ASSERT_EQ(out[(i * c.Hq + h) * c.Dv + d], 0.0);
        } else {
          EXPECT_TRUE(std::isfinite(l)) << "row " << i;
        }
      }
  }
  check_forward(c);
  check_backward(c);
}

TEST(FlashForward, NoVisibleKeysAtAll) {
  Case c;
  c.Sq = 7;
  c.Sk = 131;
  c.wl = 0;
  c.wr = 0;
  c.k_offset = 1000;  // window never reaches the keys
  check_forward(c);
  check_backward(c);
}

TEST(FlashForward, EmptyKeyOrQuerySetsAreHandled) {
  Case c;
  c.Sq = 7;
  c.Sk = 0;  // no keys: out = 0, lse = -inf, dq = 0
  check_forward(c);
  check_backward(c);
  c.Sq = 0;
  c.Sk = 7;  // no queries: dk = dv = 0
  check_forward(c);
  check_backward(c);
}

TEST(FlashBackward, MatchesNaiveAcrossSizesAndMasksFp32) {
  for (int64_t s : {1, 7, 131, 257}) {
    Case base;
    base.Sq = s;
    base.Sk = s;
    for (const Case& c : mask_variants(base)) check_backward(c);
  }
}

TEST(FlashBackward, GqaSumsKeyGradientsOverTheGroup) {
  Case c;
  c.B = 2;
  c.Sq = 70;
  c.Sk = 257;  // several key blocks for one (batch, KV head): the chunked dq path
  c.Hq = 4;
  c.Hkv = 1;
  for (const Case& v : mask_variants(c)) check_backward(v);
  c.Hkv = 2;
  c.B = 1;
  c.causal = true;
  c.q_offset = 187;
  check_backward(c);
  // One (batch, KV head) pair: keys always split into chunks with per-chunk dq scratch.
  c.Hq = 2;
  c.Hkv = 1;
  c.q_offset = 0;
  c.causal = false;
  check_backward(c);
  c.dtype = DType::kBFloat16;
  c.out_dtype = DType::kFloat32;
  check_backward(c, true);
}

TEST(FlashBackward, Bf16AndFp16Inputs) {
  for (DType t : {DType::kBFloat16, DType::kFloat16}) {
    for (DType o : {t, DType::kFloat32}) {
      Case c;
      c.Sq = 131;
      c.Sk = 131;
      c.dtype = t;
      c.out_dtype = o;
      c.causal = true;
      check_backward(c);
    }
  }
}

// The backward's bf16 dot-product tiles (AVX512-BF16): key and query blocks with odd tails
// (pairs padded with zero), Dv != D, one query, one key, masks, GQA, strided operands and
// accumulation, bf16 gradients (P and dS rounded once) and fp32 gradients (hi + lo, held to
// the fp32 tolerance), and an odd head dim (which takes the fp32 tiles of the same policy).
TEST(FlashBackward, Bf16DotProductTilesAcrossTailsAndMasks) {
  if (!kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16))
    GTEST_SKIP() << "no AVX512-BF16 on this CPU/build: the bf16 backward tiles are not tested here";
  for (Case c : bf16_tile_cases({// Sq, Sk, D, Dv
                                 {1, 1, 64, 64},
                                 {7, 131, 128, 128},
                                 {67, 65, 64, 32},
                                 {37, 129, 80, 72},
                                 {65, 33, 576, 512},
                                 {5, 17, 7, 3}})) {
    check_backward(c);
    c.strided = true;
    check_backward(c, true);
  }
}

TEST(FlashBackward, HeadDimsIncludingOddAndMlaSized) {
  const std::vector<std::pair<int64_t, int64_t>> dims{
      {128, 128}, {80, 80}, {192, 128}, {576, 512}, {7, 3}};
  for (auto [d, dv] : dims) {
    Case c;
    c.Sq = 37;
    c.Sk = 70;
    c.D = d;
    c.Dv = dv;
    c.Hq = 2;
    c.Hkv = 1;
    c.causal = true;
    c.q_offset = 40;
    c.strided = true;
    check_backward(c);
  }
}

TEST(FlashBackward, AccumulateAddsIntoExistingGradients) {
  Case c;
  c.Sq = 131;
  c.Sk = 70;
  c.Hq = 4;
  c.Hkv = 2;
  c.causal = true;
  c.q_offset = 70;
  check_backward(c, true);
  c.out_dtype = DType::kFloat32;
  c.dtype = DType::kBFloat16;
  check_backward(c, true);
}

TEST(FlashBackward, KeyBlocksSumToTheFullGradient) {
  // Ring backward: two calls on the two halves of the keys, with the full out/lse and
  // accumulate, give the gradients of one call over all keys.
  Case c;
  c.Sq = 131;
  c.Sk = 131;
  c.causal = true;
  for (CpuKernelIsa isa : isas()) {
    SCOPED_TRACE(kernels::cpu::cpu_kernel_isa_name(isa));
    IsaGuard guard(isa);
    const Inputs in = make_inputs(c);
    Buf dout = make_bshd(c.B, c.Sq, c.Hq, c.Dv, c.dtype, false);
    fill(dout.view, 4);
    const ForwardResult f = run_forward(c, in, c.opts());
    Tensor dq_full = Tensor::empty({c.B, c.Sq, c.Hq, c.D}, DType::kFloat32);
    Tensor dk_full = Tensor::empty({c.B, c.Sk, c.Hkv, c.D}, DType::kFloat32);
    Tensor dv_full = Tensor::empty({c.B, c.Sk, c.Hkv, c.Dv}, DType::kFloat32);
    kernels::cpu::flash_backward(in.q.view, in.k.view, in.v.view, f.out.view, dout.view, f.lse,
                                 dq_full, dk_full, dv_full, c.opts(), {});
    Tensor dq = Tensor::zeros({c.B, c.Sq, c.Hq, c.D}, DType::kFloat32);
    Tensor dk = Tensor::empty({c.B, c.Sk, c.Hkv, c.D}, DType::kFloat32);
    Tensor dv = Tensor::empty({c.B, c.Sk, c.Hkv, c.Dv}, DType::kFloat32);
    const int64_t half = 60;
    for (int part = 0; part < 2; ++part) {
      const int64_t j0 = part == 0 ? 0 : half, n = part == 0 ? half : c.Sk - half;
      ops::AttentionOptions o = c.opts();
      o.k_offset = j0;
      ops::BackwardOptions bo;
      bo.accumulate = true;
      const TensorView dkp = dk.view().slice(1, j0, n), dvp = dv.view().slice(1, j0, n);
      device_memset_zero(dk.data_as<float>() + j0 * c.Hkv * c.D, Device::cpu(),
                         static_cast<size_t>(n * c.Hkv * c.D) * 4);
      device_memset_zero(dv.data_as<float>() + j0 * c.Hkv * c.Dv, Device::cpu(),
                         static_cast<size_t>(n * c.Hkv * c.Dv) * 4);
      kernels::cpu::flash_backward(in.q.view, in.k.view.slice(1, j0, n), in.v.view.slice(1, j0, n),
                                   f.out.view, dout.view, f.lse, dq, dkp, dvp, o, bo);
    }
    for (auto [a, b] : {std::pair{&dq, &dq_full}, {&dk, &dk_full}, {&dv, &dv_full}}) {
      const auto e = compare(to_double_vector(*a), to_double_vector(*b));
      EXPECT_EQ(e.non_finite, 0);
      EXPECT_LE(e.rel(), 1e-5);
    }
  }
}

TEST(FlashKernels, PortableAndAvx512Agree) {
  if (!kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512))
    GTEST_SKIP() << "no AVX-512 on this CPU/build";
  Case c;
  c.Sq = 257;
  c.Sk = 257;
  c.D = 128;
  c.Dv = 128;
  c.causal = true;
  expect_isas_agree(c, CpuKernelIsa::kPortable, CpuKernelIsa::kAvx512, 1e-5);
}

TEST(FlashKernels, ProgressHookIsCalledFromOneThreadAtATime) {
  struct Ctx {
    std::atomic<int> calls{0};
    std::atomic<int> inside{0};
    std::atomic<int> overlaps{0};
    std::atomic<int> non_master{0};
  };
  Case c;
  c.Sq = 257;
  c.Sk = 257;
  c.Hq = 4;
  c.Hkv = 4;
  for (CpuKernelIsa isa : isas()) {
    SCOPED_TRACE(kernels::cpu::cpu_kernel_isa_name(isa));
    IsaGuard guard(isa);
    Ctx ctx;
    ops::AttentionOptions o = c.opts();
    o.progress = [](void* p) {
      Ctx* x = static_cast<Ctx*>(p);
      if (x->inside.fetch_add(1) != 0) x->overlaps.fetch_add(1);
      if (omp_get_thread_num() != 0) x->non_master.fetch_add(1);
      x->calls.fetch_add(1);
      x->inside.fetch_sub(1);
    };
    o.progress_ctx = &ctx;
    const Inputs in = make_inputs(c);
    const ForwardResult f = run_forward(c, in, o);
    const int fwd_calls = ctx.calls.load();
    EXPECT_GT(fwd_calls, 0);
    Buf dout = make_bshd(c.B, c.Sq, c.Hq, c.Dv, c.dtype, false);
    fill(dout.view, 4);
    Tensor dq = Tensor::empty({c.B, c.Sq, c.Hq, c.D}, DType::kFloat32);
    Tensor dk = Tensor::empty({c.B, c.Sk, c.Hkv, c.D}, DType::kFloat32);
    Tensor dv = Tensor::empty({c.B, c.Sk, c.Hkv, c.Dv}, DType::kFloat32);
    kernels::cpu::flash_backward(in.q.view, in.k.view, in.v.view, f.out.view, dout.view, f.lse, dq,
                                 dk, dv, o, {});
    EXPECT_GT(ctx.calls.load(), fwd_calls);
    EXPECT_EQ(ctx.overlaps.load(), 0);
    EXPECT_EQ(ctx.non_master.load(), 0);
  }
}

// A software model of the tile instructions amx_gemm_bf16 issues (Intel SDM: LDTILECFG,
// TILEZERO, TILELOADD, TILESTORED, TDPBF16PS, TILERELEASE) on the tile shapes of its
// configuration, so that the AMX driver's blocking, zero padding and epilogue are checked on
// machines without AMX. Where the CPU has AMX, the forward/backward/decode suites run the
// hardware tiles (isas() includes kAmx).
struct AmxModelTiles {
  static inline kernels::cpu::AmxTileConfig cfg;
  static inline bool configured = false;
  static inline uint8_t tmm[8][16][64];
  static inline int64_t dps = 0;
  static inline int64_t c_loads = 0;

  static void begin(const kernels::cpu::AmxTileConfig* c) {
    EXPECT_FALSE(configured) << "tile config loaded twice without a release";
    cfg = *c;
    configured = true;
    EXPECT_EQ(cfg.palette, 1);
    for (int t = 0; t < 8; ++t) {
      EXPECT_LE(cfg.rows[t], 16);
      EXPECT_LE(cfg.colsb[t], 64);
    }
  }
  static void end() { configured = false; }
  static void zero_c() {
    EXPECT_TRUE(configured);
    for (int t = 0; t < 4; ++t) std::memset(tmm[t], 0, sizeof(tmm[t]));
  }
  static void load(int t, const void* p, int64_t stride) {
    EXPECT_TRUE(configured);
    std::memset(tmm[t], 0, sizeof(tmm[t]));
    for (int r = 0; r < cfg.rows[t]; ++r)
      std::memcpy(tmm[t][r], static_cast<const char*>(p) + r * stride, cfg.colsb[t]);
  }
  static void load_c(const float* c0, const float* c1, const float* c2, const float* c3,
                     int64_t stride) {
    load(0, c0, stride);
    load(1, c1, stride);
    load(2, c2, stride);
    load(3, c3, stride);
    ++c_loads;
  }
  static void load_ab(const void* a0, int64_t sa0, const void* a1, int64_t sa1, const void* b0,
                      int64_t sb0, const void* b1, int64_t sb1) {
    load(4, a0, sa0);
    load(5, a1, sa1);
    load(6, b0, sb0);
    load(7, b1, sb1);
  }
  static float bf16_at(int t, int r, int i) {
    uint16_t h;
    std::memcpy(&h, &tmm[t][r][2 * i], 2);
    return bf16_t::to_float(h);
  }
  // C[m][n] += A[m].bf16[2k] * B[k].bf16[2n] + A[m].bf16[2k+1] * B[k].bf16[2n+1].
  static void dp(int c, int a, int b) {
    EXPECT_TRUE(configured);
    EXPECT_EQ(cfg.colsb[a] / 4, cfg.rows[b]) << "A's pairs must match B's rows";
    for (int m = 0; m < cfg.rows[c]; ++m)
      for (int n = 0; n < cfg.colsb[c] / 4; ++n) {
        float acc;
        std::memcpy(&acc, &tmm[c][m][4 * n], 4);
        for (int k = 0; k < cfg.colsb[a] / 4; ++k) {
          acc += bf16_at(a, m, 2 * k) * bf16_at(b, k, 2 * n);
          acc += bf16_at(a, m, 2 * k + 1) * bf16_at(b, k, 2 * n + 1);
        }
        std::memcpy(&tmm[c][m][4 * n], &acc, 4);
      }
    ++dps;
  }
  static void dp4() {
    dp(0, 4, 6);
    dp(1, 4, 7);
    dp(2, 5, 6);
    dp(3, 5, 7);
  }
  static void store(int t, float* p, int64_t stride) {
    for (int r = 0; r < cfg.rows[t]; ++r)
      std::memcpy(reinterpret_cast<char*>(p) + r * stride, tmm[t][r], cfg.colsb[t]);
  }
  static void store_c(float* c0, float* c1, float* c2, float* c3, int64_t stride) {
    store(0, c0, stride);
    store(1, c1, stride);
    store(2, c2, stride);
    store(3, c3, stride);
  }
};

// The AMX driver on the model against an fp64 product of the same bf16 values: full and
// partial tiles in every dimension, A pairs contiguous (loaded in place) and strided (as the
// P V and dS^T Q products pass them), overwrite and accumulate, a scale.
TEST(FlashKernels, AmxGemmDriverMatchesFp64OnTheTileModel) {
  struct Shape {
    int64_t m, n, k2;
  };
  for (const Shape sh : {Shape{1, 1, 1}, Shape{16, 16, 16}, Shape{32, 32, 32}, Shape{17, 33, 5},
                         Shape{128, 128, 64}, Shape{64, 72, 33}, Shape{5, 300, 70}})
    for (bool strided_a : {false, true})
      for (bool accumulate : {false, true})
        for (const float mul : {0.37f, 1.f}) {
          SCOPED_TRACE("M " + std::to_string(sh.m) + " N " + std::to_string(sh.n) + " K2 " +
                       std::to_string(sh.k2) + (strided_a ? " strided A" : "") +
                       (accumulate ? " accumulate" : "") + " mul " + std::to_string(mul));
          // A(m, k2) at a + m*ars + k2*ats: rows of 2*K2 values (padded by 6), or pairs along m
          // with the k2 stride of a packed block (ats = 2 * ld).
          const int64_t ld = sh.m + 3;
          const int64_t ars = strided_a ? 2 : 2 * sh.k2 + 6, ats = strided_a ? 2 * ld : 2;
          std::vector<uint16_t> a(static_cast<size_t>(strided_a ? 2 * ld * sh.k2 : sh.m * ars));
          std::vector<uint32_t> b(static_cast<size_t>(sh.k2 * (sh.n + 5)));
          const int64_t ldb = sh.n + 5;
          uint64_t state = 12345 + static_cast<uint64_t>(sh.m * 7 + sh.n * 3 + sh.k2);
          const auto next = [&state] {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            return static_cast<float>(static_cast<int64_t>(state >> 40) % 2001 - 1000) / 500.0f;
          };
          for (auto& x : a) x = bf16_t::from_float(next());
          for (auto& w : b)
            w = static_cast<uint32_t>(bf16_t::from_float(next())) |
                (static_cast<uint32_t>(bf16_t::from_float(next())) << 16);
          const int64_t ldc = sh.n + 2;
          std::vector<float> c(static_cast<size_t>(sh.m * ldc));
          for (auto& x : c) x = next();
          std::vector<double> ref(c.begin(), c.end());
          const auto val = [](uint16_t h) { return static_cast<double>(bf16_t::to_float(h)); };
          double max_ref = 0;
          for (int64_t m = 0; m < sh.m; ++m)
            for (int64_t n = 0; n < sh.n; ++n) {
              double acc = 0;
              for (int64_t k = 0; k < sh.k2; ++k) {
                const uint16_t* ap = a.data() + m * ars + k * ats;
                const uint32_t w = b[static_cast<size_t>(k * ldb + n)];
                acc += val(ap[0]) * val(static_cast<uint16_t>(w & 0xFFFFu)) +
                       val(ap[1]) * val(static_cast<uint16_t>(w >> 16));
              }
              double& r = ref[static_cast<size_t>(m * ldc + n)];
              r = (accumulate ? r : 0.0) + mul * acc;
              max_ref = std::max(max_ref, std::abs(r));
            }
          AmxModelTiles::dps = 0;
          AmxModelTiles::c_loads = 0;
          kernels::cpu::amx_gemm_bf16<AmxModelTiles>(sh.m, sh.n, sh.k2, a.data(), ars, ats,
                                                     b.data(), ldb, c.data(), ldc, accumulate, mul);
          EXPECT_FALSE(AmxModelTiles::configured) << "tiles not released";
          EXPECT_EQ(AmxModelTiles::dps,
                    4 * ((sh.m + 31) / 32) * ((sh.n + 31) / 32) * ((sh.k2 + 15) / 16));
          // Whole 32 x 32 blocks of C accumulate in place when there is no scale.
          EXPECT_EQ(AmxModelTiles::c_loads,
                    accumulate && mul == 1.f ? (sh.m / 32) * (sh.n / 32) : 0);
          double max_err = 0;
          for (size_t x = 0; x < c.size(); ++x) {
            const bool in_c = static_cast<int64_t>(x) % ldc < sh.n;
            max_err = std::max(max_err, std::abs(c[x] - (in_c ? ref[x] : ref[x])));
          }
          EXPECT_LE(max_err, 1e-5 * std::max(1.0, max_ref));
        }
}

TEST(FlashKernels, IsaSelectionRejectsUnavailableAndNamesThem) {
  EXPECT_STREQ(kernels::cpu::cpu_kernel_isa_name(CpuKernelIsa::kPortable), "portable");
  EXPECT_TRUE(kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kPortable));
  {
    IsaGuard guard(CpuKernelIsa::kPortable);
    EXPECT_EQ(kernels::cpu::active_cpu_kernel_isa(), CpuKernelIsa::kPortable);
  }
  for (CpuKernelIsa isa : {CpuKernelIsa::kAvx512, CpuKernelIsa::kAvx512Bf16, CpuKernelIsa::kAmx}) {
    SCOPED_TRACE(kernels::cpu::cpu_kernel_isa_name(isa));
    if (!kernels::cpu::cpu_kernel_isa_available(isa)) {
      EXPECT_THROW(kernels::cpu::set_cpu_kernel_isa(isa), Error);
    } else {
      IsaGuard guard(isa);
      EXPECT_EQ(kernels::cpu::active_cpu_kernel_isa(), isa);
    }
  }
  EXPECT_STREQ(kernels::cpu::cpu_kernel_isa_name(CpuKernelIsa::kAvx512Bf16), "avx512bf16");
  EXPECT_STREQ(kernels::cpu::cpu_kernel_isa_name(CpuKernelIsa::kAmx), "amx");
  // AMX implies AVX512-BF16, which implies AVX-512; auto takes the widest level the CPU has.
  const bool env_unset = std::getenv("DISTATTN_CPU_KERNEL") == nullptr;
  if (kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAmx)) {
    EXPECT_TRUE(kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16));
    if (env_unset) EXPECT_EQ(kernels::cpu::active_cpu_kernel_isa(), CpuKernelIsa::kAmx);
  } else if (kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16) && env_unset) {
    EXPECT_EQ(kernels::cpu::active_cpu_kernel_isa(), CpuKernelIsa::kAvx512Bf16);
  }
  if (kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512Bf16))
    EXPECT_TRUE(kernels::cpu::cpu_kernel_isa_available(CpuKernelIsa::kAvx512));
}

}  // namespace
}  // namespace distattn
