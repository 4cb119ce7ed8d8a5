// libFuzzer harness: layout and shape validation of the local attention ops
// (ops::attention_forward / attention_backward on CPU tensors). The input picks shapes
// (including 0 and mismatched extents), dtypes (including ones the ops reject), strides
// (packed, padded, seq/head transposed, non-unit or zero last-dim stride, random signed strides
// for inputs), q/k offsets, causal and sliding-window masks and the softmax scale. Every
// buffer is exactly as large as its view reaches, so a read or write outside a view is an
// ASan report. The op must either throw distattn::Error, or produce out/lse (and, for fp32,
// dq/dk/dv) that match the fp64 reference (kernels/cpu/reference.h) within the dtype's
// tolerance; every output element must be written.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "distattn/core/error.h"
#include "distattn/core/half.h"
#include "distattn/core/tensor_view.h"
#include "distattn/ops/attention.h"
#include "kernels/cpu/reference.h"

namespace {

using namespace distattn;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_attention: %s\n", what.c_str());
  std::abort();
}

// A view over a buffer exactly as large as the view reaches (any signed strides).
struct FuzzTensor {
  std::vector<unsigned char> storage;
  TensorView view;
};

enum class Role { kInput, kOutput };

FuzzTensor make_tensor(FuzzedDataProvider& fdp, std::vector<int64_t> shape, DType dtype,
                       Role role) {
  const int nd = static_cast<int>(shape.size());
  std::vector<int64_t> strides(shape.size(), 0);
  const int mode = fdp.ConsumeIntegralInRange<int>(0, role == Role::kInput ? 5 : 3);
  std::vector<int64_t> order(shape.size());
  for (int i = 0; i < nd; ++i) order[static_cast<size_t>(i)] = i;
  if (mode == 2 && nd == 4) std::swap(order[1], order[2]);  // [B, H, S, D] in memory
  int64_t step = 1;
  for (int j = nd - 1; j >= 0; --j) {
    const int d = static_cast<int>(order[static_cast<size_t>(j)]);
    strides[static_cast<size_t>(d)] = step;
    const int64_t pad = mode == 1 ? fdp.ConsumeIntegralInRange<int64_t>(0, 3) : 0;
    step *= std::max<int64_t>(shape[static_cast<size_t>(d)], 1) + pad;
  }
  if (mode == 3) strides[static_cast<size_t>(nd - 1)] = role == Role::kInput ? 0 : 2;
  if (mode == 3 && role == Role::kOutput)
    for (int d = 0; d < nd - 1; ++d) strides[static_cast<size_t>(d)] *= 2;
  if (mode == 4)
    for (auto& s : strides) s = fdp.ConsumeIntegralInRange<int64_t>(-9, 9);
  if (mode == 5) strides[0] = 0;  // batch broadcast
  int64_t lo = 0, hi = 0;
  bool empty = false;
  for (int d = 0; d < nd; ++d) {
    const int64_t n = shape[static_cast<size_t>(d)];
    if (n <= 0) empty = true;
    const int64_t reach = (std::max<int64_t>(n, 1) - 1) * strides[static_cast<size_t>(d)];
    (reach < 0 ? lo : hi) += reach;
  }
  FuzzTensor t;
  const size_t elt = dtype_size(dtype);
  t.storage.resize(empty ? 0 : static_cast<size_t>(hi - lo + 1) * elt);
  unsigned char* base =
      t.storage.empty() ? nullptr : t.storage.data() - lo * static_cast<int64_t>(elt);
  t.view = TensorView(base, dtype, Device::cpu(), shape, strides);
  return t;
}

void for_each_index(const TensorView& v, const auto& f) {
  if (v.numel() == 0) return;
  std::vector<int64_t> at(static_cast<size_t>(v.ndim), 0);
  for (;;) {
    f(at);
    int d = v.ndim - 1;
    while (d >= 0 && ++at[static_cast<size_t>(d)] == v.size(d)) at[static_cast<size_t>(d--)] = 0;
    if (d < 0) return;
  }
}

bool is_float(DType t) {
  return t == DType::kFloat32 || t == DType::kBFloat16 || t == DType::kFloat16 ||
         t == DType::kFloat64;
}

// Element access of its own (as tests/unit/test_elementwise.cpp): the oracle side must not
// go through the conversions under test.
void store(const TensorView& v, const std::vector<int64_t>& at, double x) {
  void* p = v.element_ptr(at);
  switch (v.dtype) {
    case DType::kFloat32:
      *static_cast<float*>(p) = static_cast<float>(x);
      break;
    case DType::kFloat64:
      *static_cast<double*>(p) = x;
      break;
    case DType::kBFloat16:
      *static_cast<uint16_t*>(p) = bf16_t::from_float(static_cast<float>(x));
      break;
    case DType::kFloat16:
      *static_cast<uint16_t*>(p) = fp16_t::from_float(static_cast<float>(x));
      break;
    case DType::kInt32:
      *static_cast<int32_t*>(p) = static_cast<int32_t>(x * 100);
      break;
    case DType::kInt64:
      *static_cast<int64_t*>(p) = static_cast<int64_t>(x * 100);
      break;
    case DType::kUInt8:
      *static_cast<uint8_t*>(p) = static_cast<uint8_t>(std::fabs(x) * 100);
      break;
  }
}

double load(const TensorView& v, const std::vector<int64_t>& at) {
  const void* p = v.element_ptr(at);
  switch (v.dtype) {
    case DType::kFloat32:
      return *static_cast<const float*>(p);
    case DType::kFloat64:
      return *static_cast<const double*>(p);
    case DType::kBFloat16:
      return bf16_t::to_float(*static_cast<const uint16_t*>(p));
    case DType::kFloat16:
      return fp16_t::to_float(*static_cast<const uint16_t*>(p));
    default:
      return 0;
  }
}

void fill(const TensorView& v, uint64_t seed) {
  for_each_index(v, [&](const std::vector<int64_t>& at) {
    uint64_t h = seed * 0x9e3779b97f4a7c15ull;
    for (int64_t i : at) h = (h ^ static_cast<uint64_t>(i + 1)) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 29;
    store(v, at, static_cast<double>(h % 2001) / 1000.0 - 1.0);
  });
}

void poison(const TensorView& v) {
  if (!is_float(v.dtype)) return;
  for_each_index(v, [&](const std::vector<int64_t>& at) {
    store(v, at, std::numeric_limits<double>::quiet_NaN());
  });
}

double tolerance(DType a, DType b) {
  const auto tol = [](DType t) {
    return t == DType::kBFloat16 ? 3e-2 : t == DType::kFloat16 ? 1e-2 : 1e-4;
  };
  return std::max(tol(a), tol(b));
}

// Every element of `got` against the packed fp64 `ref` of the same shape.
void compare(const char* name, const TensorView& got, const Tensor& ref, double tol, bool lse) {
  const double* r = ref.data_as<double>();
  int64_t i = 0;
  for_each_index(got, [&](const std::vector<int64_t>& at) {
    const double g = load(got, at), w = r[i++];
    if (lse && std::isinf(w) && w < 0) {
      if (!(std::isinf(g) && g < 0)) fail(std::string(name) + ": fully masked row is not -inf");
      return;
    }
    const double scale = lse ? 1.0 + std::fabs(w) : 1.0;
    if (!std::isfinite(g) || std::fabs(g - w) > tol * scale)
      fail(std::string(name) + " differs from the fp64 reference: got " + std::to_string(g) +
           ", want " + std::to_string(w));
  });
}

DType pick_dtype(FuzzedDataProvider& fdp, DType usual) {
  static constexpr DType kAll[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16,
                                   DType::kFloat64, DType::kInt32,    DType::kUInt8};
  return fdp.ConsumeIntegralInRange<int>(0, 7) < 6 ? usual : fdp.PickValueInArray(kAll);
}

int64_t pick_offset(FuzzedDataProvider& fdp) {
  switch (fdp.ConsumeIntegralInRange<int>(0, 5)) {
    case 0:
    case 1:
      return 0;
    case 2:
      return fdp.ConsumeIntegralInRange<int64_t>(0, 8);
    case 3:
      return fdp.ConsumeIntegralInRange<int64_t>(-8, -1);
    case 4:
      return int64_t{1} << fdp.ConsumeIntegralInRange<int>(20, 62);
    default:
      return fdp.ConsumeIntegral<int64_t>();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  const auto dim = [&](int64_t lo, int64_t hi) {
    return fdp.ConsumeIntegralInRange<int64_t>(lo, hi);
  };
  const int64_t b = dim(0, 2), sq = dim(0, 6), sk = dim(0, 6), hkv = dim(0, 3);
  const int64_t hq = fdp.ConsumeBool() ? hkv * dim(1, 3) : dim(0, 6);
  const int64_t d = fdp.ConsumeBool() ? dim(1, 8) : dim(0, 600);
  const int64_t dv = fdp.ConsumeBool() ? d : dim(0, 9);
  if (d > 16 && sq * sk * std::max<int64_t>(hq, 1) * b > 64) return 0;  // keep each run small
  const DType in_t = fdp.PickValueInArray({DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  const DType qt = pick_dtype(fdp, in_t), kt = pick_dtype(fdp, in_t), vt = pick_dtype(fdp, in_t);
  const DType ot = pick_dtype(fdp, fdp.ConsumeBool() ? in_t : DType::kFloat32);
  const DType lt = pick_dtype(fdp, DType::kFloat32);
  const bool wrong_lse = fdp.ConsumeIntegralInRange<int>(0, 9) == 0;

  ops::AttentionOptions o;
  o.causal = fdp.ConsumeBool();
  o.q_offset = pick_offset(fdp);
  o.k_offset = pick_offset(fdp);
  if (fdp.ConsumeBool()) o.window_left = fdp.ConsumeIntegralInRange<int64_t>(-2, 6);
  if (fdp.ConsumeBool()) o.window_right = fdp.ConsumeIntegralInRange<int64_t>(-2, 6);
  if (fdp.ConsumeBool()) o.softmax_scale = fdp.ConsumeFloatingPointInRange<float>(0.05f, 2.0f);

  FuzzTensor q = make_tensor(fdp, {b, sq, hq, d}, qt, Role::kInput);
  FuzzTensor k = make_tensor(fdp, {b, sk, hkv, d}, kt, Role::kInput);
  FuzzTensor v = make_tensor(fdp, {b, sk, hkv, dv}, vt, Role::kInput);
  FuzzTensor out = make_tensor(fdp, {b, sq, hq, dv}, ot, Role::kOutput);
  FuzzTensor lse = make_tensor(fdp, {b, hq, sq + (wrong_lse ? 1 : 0)}, lt, Role::kOutput);
  fill(q.view, 1);
  fill(k.view, 2);
  fill(v.view, 3);
  poison(out.view);
  poison(lse.view);
  if (std::getenv("FUZZ_VERBOSE"))
    std::fprintf(
        stderr,
        "case: b %lld sq %lld sk %lld hq %lld hkv %lld d %lld dv %lld causal %d q_off %lld "
        "k_off %lld window %lld,%lld scale %g dtypes %s %s %s -> %s %s\n",
        (long long)b, (long long)sq, (long long)sk, (long long)hq, (long long)hkv, (long long)d,
        (long long)dv, int(o.causal), (long long)o.q_offset, (long long)o.k_offset,
        (long long)o.window_left, (long long)o.window_right,
        double(o.softmax_scale.value_or(-1.0f)), dtype_name(qt), dtype_name(kt), dtype_name(vt),
        dtype_name(ot), dtype_name(lt));
  try {
    ops::attention_forward(q.view, k.view, v.view, out.view, lse.view, o);
  } catch (const Error&) {
    return 0;  // rejected with a message
  }
  // Accepted: it must be right.
  if (wrong_lse) fail("an lse of the wrong shape was accepted");
  const auto ref = kernels::cpu::reference_attention_forward(q.view, k.view, v.view, o);
  const double tol_all = std::max(tolerance(qt, kt), tolerance(vt, ot));
  compare("out", out.view, ref.out, tol_all, false);
  compare("lse", lse.view, ref.lse, tol_all, true);

  if (!fdp.ConsumeBool()) return 0;
  const DType gt = pick_dtype(fdp, in_t);
  FuzzTensor dout = make_tensor(fdp, {b, sq, hq, dv}, pick_dtype(fdp, in_t), Role::kInput);
  FuzzTensor dq = make_tensor(fdp, {b, sq, hq, d}, gt, Role::kOutput);
  FuzzTensor dk = make_tensor(fdp, {b, sk, hkv, d}, gt, Role::kOutput);
  FuzzTensor dvt = make_tensor(fdp, {b, sk, hkv, dv}, gt, Role::kOutput);
  fill(dout.view, 4);
  poison(dq.view);
  poison(dk.view);
  poison(dvt.view);
  try {
    ops::attention_backward(q.view, k.view, v.view, out.view, dout.view, lse.view, dq.view, dk.view,
                            dvt.view, o);
  } catch (const Error&) {
    return 0;
  }
  const bool all_fp32 = qt == DType::kFloat32 && kt == DType::kFloat32 && vt == DType::kFloat32 &&
                        ot == DType::kFloat32 && gt == DType::kFloat32 &&
                        dout.view.dtype == DType::kFloat32;
  if (!all_fp32) return 0;  // half-precision gradients: checked by the unit tests' tolerances
  const auto rb = kernels::cpu::reference_attention_backward(q.view, k.view, v.view, dout.view, o);
  compare("dq", dq.view, rb.dq, 1e-3, false);
  compare("dk", dk.view, rb.dk, 1e-3, false);
  compare("dv", dvt.view, rb.dv, 1e-3, false);
  return 0;
}
